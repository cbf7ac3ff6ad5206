"""Block-diffusion denoising inside vLLM: the batched per-step update and the per-request state.

One engine step gives, for every running request, the logits at the non-prompt positions of its
in-progress block (they travel as vLLM "draft" tokens: masks and already-unmasked tokens). This
module turns them into the next state of each block, exactly as the reference
(`vllm_dllm_spec.reference.generate`) does one denoising step:

- predict: greedy -> argmax, confidence = untempered softmax prob; sampling -> logits / T,
  top_k, top_p, sample; confidence = the sampled token's prob (reference `predict`).
- select (`select_to_unmask`, batched over requests): sequential / low_confidence_static /
  low_confidence_dynamic / entropy_bounded with the reference's stable tie-breaking.
- when a block has no mask left its tokens are final: they become the request's output, and the
  next step feeds the next block's masks (and re-feeds the finished block as its KV commit).

`BlockDiffusionProposer` is the `custom_class` speculative proposer vLLM instantiates in the
model runner; the runner (`vllm_dllm_spec.worker`) calls `denoise()` from its `_sample` and the
proposer hands the resulting drafts to the scheduler through `propose()`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Collection, Mapping

import numpy as np
import torch
from vllm.logger import init_logger
from vllm.v1.sample.logits_processor import LogitsProcessor

from vllm_dllm_spec.config import REMASKING_STRATEGIES, DenoiseParams, DLLMSpecConfig, SamplingKnobs
from vllm_dllm_spec.logprobs import gather, requested
from vllm_dllm_spec.reference.generate import filter_top_k_top_p

logger = init_logger("vllm." + __name__)  # under "vllm" so vLLM's log config applies
ALL_STRATEGIES = tuple(range(len(REMASKING_STRATEGIES)))  # strategy codes: index in REMASKING_STRATEGIES
SEQUENTIAL, STATIC, DYNAMIC, ENTROPY = ALL_STRATEGIES
PLACEHOLDER = -1  # vLLM's PLACEHOLDER_TOKEN_ID: "no token" in a SamplerOutput row

# Per-request keys of SamplingParams.extra_args (server: vllm_xargs) that override the engine's
# `dllm_spec` option for one request.
REQUEST_KNOBS = ("method", "block_length", "denoising_steps", "remasking_strategy",
                 "confidence_threshold", "eb_threshold")


def sampling_knobs(sampling_params) -> SamplingKnobs:
    """A request's sampling knobs (temperature <= 1e-5: greedy; top_k <= 0: off)."""
    temperature = float(sampling_params.temperature)
    return SamplingKnobs(temperature=temperature if temperature > 1e-5 else 0.0,
                         top_k=max(int(sampling_params.top_k), 0), top_p=float(sampling_params.top_p))


def resolve_request_params(
    engine_options: Mapping[str, Any], extra_args: Mapping[str, Any] | None, model_block_size: int
) -> DenoiseParams:
    """Engine `dllm_spec` options overridden by a request's extra_args -> validated params.
    Raises ValueError naming the parameter and its allowed values."""
    merged = dict(engine_options)
    for key in REQUEST_KNOBS:
        if extra_args and key in extra_args:
            merged[key] = extra_args[key]
    cfg = DLLMSpecConfig.from_dict(merged)
    engine_method = engine_options.get("method", "block_diffusion")
    if cfg.method != engine_method:
        raise ValueError(
            f"method is chosen per engine (additional_config['dllm_spec']); this engine runs "
            f"{engine_method!r}, got {cfg.method!r} for the request"
        )
    params = cfg.denoise_params(model_block_size)
    if params.block_length != model_block_size:
        raise ValueError(
            f"block_length must be the model's trained block size {model_block_size}, "
            f"got {params.block_length!r}"
        )
    return params


def predict_greedy(logits: torch.Tensor, with_entropy: bool = True):
    """logits [T, V] -> token [T], confidence [T], entropy [T] (reference `predict`, T=0).
    Without with_entropy the entropy is zeros (only entropy_bounded reads it)."""
    probs = logits.float().softmax(-1)  # [T, V]
    token = probs.argmax(-1)  # [T]
    confidence = probs.gather(-1, token[:, None]).squeeze(-1)  # [T]
    entropy = torch.special.entr(probs).sum(-1) if with_entropy else torch.zeros_like(confidence)
    return token, confidence, entropy


def predict_sampled(logits: torch.Tensor, knobs: SamplingKnobs, generator: torch.Generator | None):
    """One request's rows with temperature > 0: logits [T, V] -> token, confidence, entropy."""
    probs = filter_top_k_top_p(logits.float() / knobs.temperature, knobs.top_k, knobs.top_p).softmax(-1)
    token = torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # [T]
    confidence = probs.gather(-1, token[:, None]).squeeze(-1)
    entropy = torch.special.entr(probs).sum(-1)
    return token, confidence, entropy


def select_to_unmask(
    strategy: torch.Tensor,  # [R] int64 strategy code
    k: torch.Tensor,  # [R] int64 tokens to unmask this step (already min'd with the masks left)
    threshold: torch.Tensor,  # [R] float32 confidence_threshold
    eb_threshold: torch.Tensor,  # [R] float32
    is_mask: torch.Tensor,  # [R, W] bool (padding columns False)
    confidence: torch.Tensor,  # [R, W] float32
    entropy: torch.Tensor,  # [R, W] float32
    present: Collection[int] = ALL_STRATEGIES,  # the codes in `strategy` (a caller that knows them)
) -> torch.Tensor:  # [R, W] bool, a non-empty subset of is_mask for every row with a mask
    """Batched twin of `reference.generate.select_to_unmask` (same stable tie-breaking). Only the
    rules of the strategies in `present` are evaluated: a row only ever reads its own rule's."""
    R, W = is_mask.shape
    rule: dict[int, torch.Tensor] = {}  # strategy code -> its selection [R, W]
    if SEQUENTIAL in present:
        seq_rank = is_mask.long().cumsum(1) - 1  # [R, W] rank among masks, left to right
        rule[SEQUENTIAL] = is_mask & (seq_rank < k[:, None])
    if STATIC in present or DYNAMIC in present:
        # rank of every column in "most confident first, lower position on ties" order
        order = confidence.masked_fill(~is_mask, float("-inf")).argsort(dim=1, descending=True, stable=True)
        conf_rank = torch.empty_like(order).scatter_(1, order, torch.arange(W).expand(R, W))  # [R, W]
        top_k = is_mask & (conf_rank < k[:, None])
        rule[STATIC] = top_k
        if DYNAMIC in present:
            confident = is_mask & (confidence > threshold[:, None])
            rule[DYNAMIC] = torch.where((confident.sum(1) >= k)[:, None], confident, top_k)
    if ENTROPY in present:
        # entropy_bounded: longest low-entropy prefix with cumulative entropy <= eb, at least one
        ent = entropy.masked_fill(~is_mask, float("inf"))
        ent_order = ent.argsort(dim=1, stable=True)  # [R, W]
        within = ent.gather(1, ent_order).cumsum(1) <= eb_threshold[:, None]
        count = within.sum(1).clamp(min=1)  # [R]
        ent_rank = torch.empty_like(ent_order).scatter_(1, ent_order, torch.arange(W).expand(R, W))
        rule[ENTROPY] = is_mask & (ent_rank < count[:, None])
    codes = [c for c in ALL_STRATEGIES if c in present]
    chosen = rule[codes[-1]]
    for c in codes[:-1]:  # one strategy in the batch: no select at all
        chosen = torch.where(strategy[:, None] == c, rule[c], chosen)
    return chosen


def _draft_cells(nd: list[int], B: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(row [T], column [T]) of every flat draft row in its request's [B] block: a request's nd
    drafts are the last nd columns."""
    nd_np = np.array(nd)  # [R]
    row = np.repeat(np.arange(len(nd)), nd_np)  # [T]
    col = np.arange(row.shape[0]) - (np.cumsum(nd_np) - nd_np)[row] + (B - nd_np)[row]  # [T]
    return torch.from_numpy(row), torch.from_numpy(col)


@dataclass
class RequestState:
    """Worker-side state of one request (identical on every TP rank)."""

    params: DenoiseParams
    knobs: SamplingKnobs
    strategy: int
    transfer: list[int]  # num_transfer_tokens per step
    block_start: int = -1  # position of the in-progress block
    step: int = 0  # denoising step within the in-progress block
    unmasked_at: list[int] = field(default_factory=list)  # [B] step that unmasked each column
    num_logprobs: int | None = None  # the request's top-k logprobs (None: none asked)
    # per column of the in-progress block, its logprobs from the step that unmasked it (vLLM's
    # row layout, logprobs.gather): ids [B, k + 1], values [B, k + 1], ranks [B]
    block_logprobs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None


class BlockDiffusionProposer:
    """vLLM `custom_class` proposer for plain SDAR block diffusion.

    Holds per-request state; `denoise()` (called by the runner's `_sample`) advances every block
    one step and remembers the drafts (= next block state) that `propose()` returns.
    """

    def __init__(self, vllm_config):
        hf = vllm_config.model_config.hf_config
        self.block_length = int(hf.block_size)
        self.mask_token_id = int(hf.mask_token_id)
        self.vocab_size = int(hf.vocab_size)
        self.engine_options = dict((vllm_config.additional_config or {}).get("dllm_spec") or {})
        self.states: dict[str, RequestState] = {}
        self._drafts: list[list[int]] = []
        # request id -> step_map of the block that finished in the last step (generated tokens)
        self.finished_step_maps: dict[str, list[int]] = {}
        # batch row -> logprobs (ids, values, ranks) of the block it finished in the last step
        self.finished_logprobs: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def load_model(self, target_model) -> None:  # CPUModelRunner.load_model calls this
        pass

    # -- request lifecycle -------------------------------------------------------------------
    def state_for(self, req_id: str, sampling_params) -> RequestState:
        st = self.states.get(req_id)
        if st is None:
            extra = getattr(sampling_params, "extra_args", None)
            try:
                params = resolve_request_params(self.engine_options, extra, self.block_length)
            except ValueError as err:  # the front-end validates; never take the engine down
                logger.warning("request %s: %s; using the engine's dllm_spec knobs", req_id, err)
                params = resolve_request_params(self.engine_options, None, self.block_length)
            st = RequestState(
                params=params, knobs=sampling_knobs(sampling_params),
                strategy=REMASKING_STRATEGIES.index(params.remasking_strategy),
                transfer=params.num_transfer_tokens(),
                num_logprobs=requested(sampling_params, self.vocab_size),
            )
            self.states[req_id] = st
        return st

    def drop(self, req_ids) -> None:
        for r in req_ids:
            self.states.pop(r, None)

    def restart_blocks(self, req_ids) -> None:
        """Preempted requests lose their in-progress block (vLLM frees its KV and drafts): it
        restarts from masks when they resume."""
        for r in req_ids:
            st = self.states.get(r)
            if st is not None:
                st.block_start = -1

    # -- one step ----------------------------------------------------------------------------
    def denoise(
        self,
        req_ids: list[str],  # batch order
        sampling_params: list,  # per request
        first_draft_pos: list[int],  # per request: position of its first draft token
        num_drafts: list[int],  # per request (0: a prompt chunk, nothing to denoise)
        draft_token_ids: torch.Tensor,  # [T = sum(num_drafts)] current block tokens (masks incl.)
        mask_logits: torch.Tensor,  # [>= M, V] row i: logits AT the i-th draft that is a mask (edited here)
        generators: Mapping[int, torch.Generator],
    ) -> torch.Tensor:  # [num_reqs, block_length] finished tokens, PLACEHOLDER elsewhere
        """One denoising step of every request with drafts. A step only unmasks masks, so only the
        M mask drafts' logits are read (in draft order, the runner's `worker.DenoiseRunnerMixin`)."""
        B, mask_id = self.block_length, self.mask_token_id
        num_reqs = len(req_ids)
        out = torch.full((num_reqs, B), PLACEHOLDER, dtype=torch.int64)
        self._drafts = [[] for _ in range(num_reqs)]
        self.finished_step_maps = {}
        self.finished_logprobs = {}
        rows = [i for i in range(num_reqs) if num_drafts[i] > 0]
        if not rows:
            return out
        states = [self.state_for(req_ids[i], sampling_params[i]) for i in rows]
        R, T = len(rows), draft_token_ids.numel()
        # the drafts are the last nd columns of their block (the leftover prompt tokens before them
        # never change); when every block is all drafts (the usual step) the flat drafts are [R, B]
        nd = [num_drafts[i] for i in rows]  # [R]
        if T == R * B:
            block = draft_token_ids.long().cpu().view(R, B)
        else:
            block = torch.full((R, B), -2, dtype=torch.int64)  # -2: a prompt column (not a mask)
            block[_draft_cells(nd, B)] = draft_token_ids.long().cpu()
        is_mask = block == mask_id  # [R, B]
        masks = is_mask.sum(1)  # [R]
        mask_logits = mask_logits[: int(masks.sum())]  # [M, V]
        # the mask token is never a prediction (reference `exclude_mask_token`), in place on the
        # runner's logits
        mask_logits[:, mask_id] = float("-inf")

        greedy = [st.knobs.temperature == 0.0 for st in states]  # [R]
        need_entropy = any(st.strategy == ENTROPY for st in states)
        if all(greedy):
            # the [M, V] reductions run on the logits' device (a GPU on CUDA); only the [M]
            # results come to the host for the per-request bookkeeping
            token, conf, ent = (t.cpu() for t in predict_greedy(mask_logits, need_entropy))
        else:
            token, conf, ent = self._predict_mixed(states, rows, is_mask, greedy, mask_logits, generators,
                                                   need_entropy)
        # [R, B] each; the columns that are no mask are never chosen
        tok2 = torch.zeros((R, B), dtype=torch.int64).masked_scatter_(is_mask, token)
        conf2 = torch.zeros((R, B), dtype=torch.float32).masked_scatter_(is_mask, conf)
        ent2 = torch.zeros((R, B), dtype=torch.float32).masked_scatter_(is_mask, ent)

        # per-request step bookkeeping (a new block starts when its position moves)
        steps, transfer = [], []
        for j, st in enumerate(states):
            start = first_draft_pos[rows[j]] // B * B
            if start != st.block_start:
                st.block_start, st.step, st.unmasked_at = start, 0, [-1] * B
                st.block_logprobs = None
            steps.append(st.step)
            transfer.append(st.transfer[st.step] if st.step < len(st.transfer) else 1)
        k = torch.minimum(torch.tensor(transfer), masks)  # [R]
        chosen = select_to_unmask(
            torch.tensor([st.strategy for st in states]), k,
            torch.tensor([st.params.confidence_threshold for st in states], dtype=torch.float32),
            torch.tensor([st.params.eb_threshold for st in states], dtype=torch.float32),
            is_mask, conf2, ent2, present={st.strategy for st in states},
        )  # [R, B]
        new_block = torch.where(chosen, tok2, block)  # [R, B]
        if any(st.num_logprobs is not None for st in states):
            self._keep_logprobs(states, chosen, is_mask, mask_logits, token)
        done = ~(new_block == mask_id).any(1)  # [R]
        unmasked_at = torch.where(chosen, torch.tensor(steps)[:, None],
                                  torch.tensor([st.unmasked_at for st in states]))  # [R, B]
        # finished blocks -> outputs (draft columns only)
        finished = torch.where(done[:, None] & (block != -2), new_block, PLACEHOLDER)  # [R, B]
        if R == num_reqs:
            out = finished
        else:
            out[rows] = finished
        new_list, ua_list, done_list = new_block.tolist(), unmasked_at.tolist(), done.tolist()
        for j, st in enumerate(states):
            d, row = nd[j], rows[j]
            st.step += 1
            if done_list[j]:
                self.finished_step_maps[req_ids[row]] = ua_list[j][B - d:]
                if st.block_logprobs is not None:
                    self.finished_logprobs[row] = tuple(t[B - d:] for t in st.block_logprobs)
                self._drafts[row] = [mask_id] * B  # the next block starts fully masked
            else:
                st.unmasked_at = ua_list[j]
                self._drafts[row] = new_list[j][B - d:]
        return out

    def _predict_mixed(self, states: list[RequestState], rows: list[int], is_mask: torch.Tensor,
                       greedy: list[bool], mask_logits: torch.Tensor, generators: Mapping[int, torch.Generator],
                       need_entropy: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """token, confidence, entropy [M] of a batch with sampled requests: the greedy requests'
        rows in one call, each sampled request in its own (per-request knobs and generator)."""
        B, M = self.block_length, mask_logits.shape[0]
        masks = is_mask.sum(1).tolist()  # [R] mask rows per request
        token = torch.zeros(M, dtype=torch.int64)
        conf = torch.zeros(M, dtype=torch.float32)
        ent = torch.zeros(M, dtype=torch.float32)
        g_rows = torch.from_numpy(np.repeat(greedy, masks))  # [M]
        if bool(g_rows.any()):
            token[g_rows], conf[g_rows], ent[g_rows] = (
                t.cpu() for t in predict_greedy(mask_logits[g_rows.to(mask_logits.device)], need_entropy))
        start = 0
        for j, st in enumerate(states):
            sl = slice(start, start + masks[j])
            start += masks[j]
            if greedy[j]:
                continue
            # sample all B rows of the block like the reference does (the columns that are no
            # mask get a dummy row): a row's draw does not depend on the other rows, so a seeded
            # request consumes its generator exactly as the reference's loop
            cols = is_mask[j].to(mask_logits.device)  # [B]
            rows_logits = mask_logits.new_zeros((B, mask_logits.shape[1]))  # [B, V]
            rows_logits[cols] = mask_logits[sl]
            t, c, e = predict_sampled(rows_logits, st.knobs, generators.get(rows[j]))
            token[sl], conf[sl], ent[sl] = t[cols].cpu(), c[cols].cpu(), e[cols].cpu()
        return token, conf, ent

    def _keep_logprobs(self, states: list[RequestState], chosen: torch.Tensor, is_mask: torch.Tensor,
                       mask_logits: torch.Tensor, token: torch.Tensor) -> None:
        """Stores, for the columns each request unmasks in this step, their logprobs under this
        step's logits (batched over the requests that asked; a loop over requests only)."""
        B = self.block_length
        fr, fc = is_mask.nonzero(as_tuple=True)  # [M] block row and column of every mask row
        want = torch.tensor([st.num_logprobs is not None for st in states])  # [R]
        k = max(st.num_logprobs for st in states if st.num_logprobs is not None)
        flat = want[fr]  # [M] mask rows of requests that asked
        dev = mask_logits.device
        ids, values, ranks = (t.cpu() for t in gather(mask_logits[flat.to(dev)], token[flat].to(dev), k))
        R = len(states)
        g_ids = torch.zeros((R, B, k + 1), dtype=torch.int64)
        g_values = torch.zeros((R, B, k + 1), dtype=torch.float32)
        g_ranks = torch.zeros((R, B), dtype=torch.int64)
        g_ids[fr[flat], fc[flat]], g_values[fr[flat], fc[flat]], g_ranks[fr[flat], fc[flat]] = ids, values, ranks
        for j, st in enumerate(states):
            if st.num_logprobs is None:
                continue
            w = st.num_logprobs + 1
            if st.block_logprobs is None:
                st.block_logprobs = (torch.zeros((B, w), dtype=torch.int64),
                                     torch.zeros((B, w), dtype=torch.float32),
                                     torch.zeros(B, dtype=torch.int64))
            c = chosen[j]
            st.block_logprobs[0][c] = g_ids[j, c, :w]
            st.block_logprobs[1][c] = g_values[j, c, :w]
            st.block_logprobs[2][c] = g_ranks[j, c]

    def propose(self, sampled_token_ids, num_tokens_no_spec=None, token_ids_cpu=None,
                slot_mappings=None) -> list[list[int]]:
        return self._drafts


# methods whose speculation is defined (and lossless) for greedy decoding only
GREEDY_ONLY_METHODS = ("psd",)
# knobs that size every step's region or name a file every worker loads: per engine only
ENGINE_ONLY_KNOBS = ("draft_graph", "graph_budget")

# SamplingParams fields vLLM's sampler would apply and block diffusion does not, with their "off"
# value (None is always off).
UNSUPPORTED_SAMPLING = {
    "presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0,
    "logit_bias": None, "allowed_token_ids": None, "bad_words": None,
    "logprob_token_ids": None, "structured_outputs": None,
}
# Prompt logprobs score each prompt token under an autoregressive next-token distribution; an
# SDAR model predicts a masked position from its own logits, and a prompt is prefilled without
# masks, so it has no distribution for its prompt tokens to report.
PROMPT_LOGPROBS = ("prompt_logprobs", "prompt_logprob_token_ids")


def _is_off(value, off) -> bool:
    return value is None or value == off or (isinstance(value, (list, tuple, dict, set)) and not value)


class RequestKnobsValidator(LogitsProcessor):
    """Front-end check of per-request knobs (SamplingParams.extra_args / server `vllm_xargs`).

    Installed by the config hook as a vLLM custom logits processor only for its
    `validate_params` hook, which vLLM runs at request admission: a ValueError there becomes an
    HTTP 400 with the message, and the engine never sees the request. `apply` is the identity
    (block diffusion samples in the runner, not through vLLM's sampler).
    """

    # (engine dllm_spec options, model block size), set by the config hook in this process
    context: tuple[dict, int] | None = None

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        unsupported = [name for name, off in UNSUPPORTED_SAMPLING.items()
                       if not _is_off(getattr(sampling_params, name, off), off)]
        if any(getattr(sampling_params, name, None) is not None for name in PROMPT_LOGPROBS):
            raise ValueError(
                "SDAR block diffusion does not support prompt_logprobs: an SDAR model predicts "
                "masked positions, not the next token, and the prompt is read without masks, so "
                "there is no distribution to score prompt tokens with (sample logprobs, "
                "`logprobs`, are supported)")
        if unsupported:
            raise ValueError(
                f"SDAR block diffusion does not support {', '.join(unsupported)} (tokens are "
                "denoised in blocks, not sampled by vLLM's sampler); leave them unset"
            )
        method = (cls.context[0] if cls.context is not None else {}).get("method")
        if method in GREEDY_ONLY_METHODS and sampling_knobs(sampling_params).temperature > 0.0:
            raise ValueError(f"method {method!r} is greedy only: temperature must be 0, got "
                             f"{sampling_params.temperature}")
        extra = getattr(sampling_params, "extra_args", None) or {}
        for key in ENGINE_ONLY_KNOBS:
            if key in extra:
                raise ValueError(f"{key} is chosen per engine (additional_config['dllm_spec']), not per "
                                 f"request; got {key}={extra[key]!r} in the request")
        if not any(key in extra for key in REQUEST_KNOBS):
            return
        if cls.context is not None:
            options, block = cls.context
            resolve_request_params(options, extra, block)
        else:
            DLLMSpecConfig.from_dict({k: extra[k] for k in REQUEST_KNOBS if k in extra})

    def __init__(self, vllm_config, device, is_pin_memory) -> None:
        pass

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def is_argmax_invariant(self) -> bool:
        return True

    def update_state(self, batch_update) -> None:
        pass
