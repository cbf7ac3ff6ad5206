"""Sample logprobs of block-diffusion outputs, in vLLM's format (`LogprobsTensors`).

A generated token's logprobs are the log-softmax of the logits it was committed from (block
diffusion / PSD: the denoising step that unmasked it; SimSD: the target's verify logits at its
mask copy), mask token excluded (-inf) as in decoding, untempered: vLLM's default
`logprobs_mode` "raw_logprobs". Each row is vLLM's sampler layout: column 0 the token itself,
then the top-k (k = the request's `logprobs`), and the token's rank (1 = most likely; ties
count as ahead, like vLLM's `batched_count_greater_than`).
"""
from __future__ import annotations

import torch
from vllm.v1.outputs import LogprobsTensors


def requested(sampling_params, vocab_size: int) -> int | None:
    """The request's top-k (None: no logprobs; -1: the whole vocabulary)."""
    n = getattr(sampling_params, "logprobs", None)
    if n is None:
        return None
    return vocab_size if int(n) == -1 else int(n)


def gather(logits: torch.Tensor, tokens: torch.Tensor, k: int):
    """logits [T, V] (mask token already -inf), tokens [T] -> ids [T, k + 1] int64,
    logprobs [T, k + 1] float32, ranks [T] int64."""
    lp = logits.float().log_softmax(-1)  # [T, V]
    tokens = tokens.to(lp.device, torch.long)[:, None]  # [T, 1]
    token_lp = lp.gather(-1, tokens)  # [T, 1]
    ranks = (lp >= token_lp).sum(-1)  # [T]
    top_lp, top_ids = lp.topk(k, dim=-1)  # [T, k]
    return torch.cat([tokens, top_ids], 1), torch.cat([token_lp, top_lp], 1), ranks


class StepLogprobs:
    """The logprobs of one step's sampled-token grid [num_reqs, width]: one row per grid cell,
    flattened as vLLM's `RejectionSampler.parse_output` expects (it keeps the rows of the cells
    that hold a token). Cells without a token keep zeros."""

    def __init__(self, num_reqs: int, width: int, k_max: int):
        self.k = k_max
        self.ids = torch.zeros((num_reqs, width, k_max + 1), dtype=torch.int64)
        self.values = torch.zeros((num_reqs, width, k_max + 1), dtype=torch.float32)
        self.ranks = torch.zeros((num_reqs, width), dtype=torch.int64)

    def put(self, row: int, cols: slice, ids: torch.Tensor, values: torch.Tensor, ranks: torch.Tensor) -> None:
        """ids / values [n, k_req + 1] (k_req <= k_max: the rest stays zero, vLLM reads only
        the request's own top-k), ranks [n]."""
        w = ids.shape[1]
        self.ids[row, cols, :w] = ids
        self.values[row, cols, :w] = values
        self.ranks[row, cols] = ranks

    def tensors(self) -> LogprobsTensors:
        n = self.ids.shape[0] * self.ids.shape[1]
        return LogprobsTensors(self.ids.view(n, -1).to(torch.int32), self.values.view(n, -1),
                               self.ranks.view(n))


def step_logprobs(sampling_params: list, vocab_size: int, width: int) -> StepLogprobs | None:
    """A grid for this step's batch when any request asks for logprobs, else None."""
    ks = [k for k in (requested(sp, vocab_size) for sp in sampling_params) if k is not None]
    return StepLogprobs(len(sampling_params), width, max(ks)) if ks else None
