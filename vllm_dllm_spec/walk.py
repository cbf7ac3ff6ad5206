"""Real denoising steps of drafted block states, batched over requests: what PSD's and Spiffy's
runners verify drafts against.

A drafted state is accepted only if plain decoding reaches it: the remasking policy applied to
the state before it, on that state's own verified logits, at the denoising step the walk stands
on, yields it. `greedy_next_states` evaluates that policy for every (request, copy, walk step)
at once (the per-step unmask count depends on the step, so a state the walk may reach after d
steps has one candidate next state per d); `ops.graph_accept` then follows the accepted path by
state equality. Sampled requests draw one real step at a time with their own generator
(`sampled_next_state`), consuming it exactly as plain decoding does.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_dllm_spec.config import REMASKING_STRATEGIES, DenoiseParams, SamplingKnobs
from vllm_dllm_spec.denoise import predict_sampled, select_to_unmask


@dataclass
class PolicyTable:
    """Per-request remasking knobs as tensors (one row per request)."""

    strategy: torch.Tensor  # [R] int64 strategy code
    threshold: torch.Tensor  # [R] float32 confidence_threshold
    eb_threshold: torch.Tensor  # [R] float32
    transfer: torch.Tensor  # [R, S] int64 tokens to unmask at step s (1 past the schedule: unreachable)

    @classmethod
    def of(cls, params: list[DenoiseParams], max_step: int) -> "PolicyTable":
        S = max([max_step] + [p.denoising_steps for p in params]) + 1
        transfer = torch.ones((len(params), S), dtype=torch.int64)
        for i, p in enumerate(params):  # once per request and step, a few entries each
            counts = p.num_transfer_tokens()
            transfer[i, : len(counts)] = torch.tensor(counts)
        return cls(
            strategy=torch.tensor([REMASKING_STRATEGIES.index(p.remasking_strategy) for p in params]),
            threshold=torch.tensor([p.confidence_threshold for p in params], dtype=torch.float32),
            eb_threshold=torch.tensor([p.eb_threshold for p in params], dtype=torch.float32),
            transfer=transfer,
        )

    def select(self, rows: torch.Tensor, steps: torch.Tensor, is_mask: torch.Tensor, confidence: torch.Tensor,
               entropy: torch.Tensor) -> torch.Tensor:
        """rows [M] request of each state, steps [M], is_mask / confidence / entropy [M, B] ->
        the positions the policy unmasks [M, B] bool (denoise.select_to_unmask)."""
        steps = steps.clamp(max=self.transfer.shape[1] - 1)
        k = torch.minimum(self.transfer[rows, steps], is_mask.sum(1))  # [M]
        return select_to_unmask(self.strategy[rows], k, self.threshold[rows], self.eb_threshold[rows],
                                is_mask, confidence, entropy)


def greedy_next_states(states: torch.Tensor, token: torch.Tensor, confidence: torch.Tensor,
                       entropy: torch.Tensor, steps: torch.Tensor, table: PolicyTable, mask_id: int
                       ) -> torch.Tensor:
    """Plain greedy steps of C block copies per request, each at D step indices.

    states [R, C, B] the copies' states; token / confidence / entropy [R, C, B] the greedy
    prediction from each copy's own logits (mask token excluded: denoise.predict_greedy);
    steps [R, C, D] the denoising step index to apply at. -> next states [R, C, D, B]."""
    R, C, B = states.shape
    D = steps.shape[2]

    def spread(t):  # [R, C, B] -> [R * C * D, B]
        return t[:, :, None, :].expand(R, C, D, B).reshape(-1, B)

    rows = torch.arange(R)[:, None, None].expand(R, C, D).reshape(-1)  # [R * C * D]
    chosen = table.select(rows, steps.reshape(-1), spread(states == mask_id), spread(confidence), spread(entropy))
    return torch.where(chosen, spread(token), spread(states)).view(R, C, D, B)


def sampled_next_state(state: torch.Tensor, logits: torch.Tensor, step: int, row: int, table: PolicyTable,
                       knobs: SamplingKnobs, generator: torch.Generator | None, mask_id: int) -> torch.Tensor:
    """One real sampled step of one request: state [B], logits [B, V] (mask token excluded) ->
    next state [B]. Draws all B rows like the reference's `predict`, one generator call."""
    token, confidence, entropy = predict_sampled(logits, knobs, generator)
    chosen = table.select(torch.tensor([row]), torch.tensor([step]), (state == mask_id)[None],
                          confidence.cpu()[None], entropy.cpu()[None])[0]
    return torch.where(chosen, token.cpu(), state)
