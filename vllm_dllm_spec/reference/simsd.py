"""SimSD speculative decoding, pure PyTorch, one prompt at a time: the oracle for the vLLM path.

Each round:
1. The draft SDAR model runs ordinary block diffusion on the current block (its known tokens
   kept) and on `num_draft_blocks - 1` further blocks, recording each token's label: 0 = known
   before the round, s + 1 = unmasked at draft step s.
2. The target runs ONE forward over `[uncommitted full blocks | data_0 | copies_0 | data_1 |
   copies_1 | ...]`: the uncommitted blocks are its fused KV commit (block-causal), each
   `copies_k` is B mask tokens that reuse the positions of `data_k` (RoPE copy) and the
   reference-token mask (`ops.ref_token_mask`) gives each copy the context the target would
   have seen at the step that decided it.
3. The target's predictions at the copies verify the drafted tokens in POSITION order:
   `greedy_match` (accept while equal, then the target's token) or `mrs` (speculative sampling:
   accept with min(1, p_target / p_draft), else sample the residual).
A round finalises `accepted + 1` tokens, or every drafted token when all are accepted. Blocks
that become complete are committed in the next round's forward, for both models.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

from vllm_dllm_spec import ops
from vllm_dllm_spec.config import SamplingKnobs, SimSDParams
from vllm_dllm_spec.reference.generate import (
    _validate,
    block_params,
    denoise_block,
    exclude_mask_token,
    filter_top_k_top_p,
    is_finished,
    output_length,
)
from vllm_dllm_spec.reference.model import KVCache, SDARModel


@dataclass
class SimSDOutput:
    tokens: list[int]  # generated ids, cut after the first eos and at gen_length
    target_forwards: int  # verification forwards (commits are fused into them)
    draft_forwards: int  # draft denoising forwards
    drafted_per_round: list[int] = field(default_factory=list)
    accepted_per_round: list[int] = field(default_factory=list)  # drafted tokens accepted
    # [len(tokens), V]: per token the log-softmax of the target's verify logits at its mask copy
    # (mask token excluded), the distribution it was accepted or (re)sampled from
    logprobs: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0))

    @property
    def acceptance_histogram(self) -> dict[int, int]:
        return dict(sorted(Counter(self.accepted_per_round).items()))


def query_block_causal(first_position: int, n: int, block_length: int) -> torch.Tensor:
    """[n, n] bool among n query tokens starting at first_position (cache columns not included)."""
    blocks = torch.arange(first_position, first_position + n) // block_length
    return blocks[None, :] <= blocks[:, None]


class CachedModel:
    """An SDARModel with its KV cache; every cached position is visible to every query."""

    def __init__(self, model: SDARModel):
        self.model = model
        self.cache = KVCache(model.config.num_hidden_layers)
        self.forwards = 0

    def __len__(self) -> int:
        return len(self.cache)

    def __call__(self, tokens, positions, query_mask, num_store: int) -> torch.Tensor:
        n, cached = tokens.numel(), len(self.cache)
        mask = torch.cat([torch.ones(n, cached, dtype=torch.bool), query_mask], dim=1)  # [n, cached + n]
        self.forwards += 1
        with torch.no_grad():
            return self.model(tokens[None], positions[None], mask[None], self.cache, num_store)[0]


def sampling_probs(logits: torch.Tensor, knobs: SamplingKnobs) -> torch.Tensor:
    """The distribution a token is drawn from: one-hot argmax when greedy. [n, V]."""
    if knobs.temperature == 0.0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).to(logits.dtype)
    return filter_top_k_top_p(logits / knobs.temperature, knobs.top_k, knobs.top_p).softmax(-1)


def draft_round(draft: CachedModel, seq: torch.Tensor, block_start: int, params: SimSDParams,
                knobs: SamplingKnobs, generator: torch.Generator, mask_id: int):
    """Block diffusion of `num_draft_blocks` blocks by the draft from `seq`.
    Returns tokens [K * B], labels [K * B] and the draft's distributions [K * B, V]."""
    B = params.draft.block_length
    uncommitted = seq[len(draft):block_start]  # full blocks whose KV the draft lacks
    known = seq[block_start:]
    tokens, labels, probs = [], [], []
    for k in range(params.num_draft_blocks):
        start = block_start + k * B
        block = torch.full((B,), mask_id)
        if k == 0:
            block[: known.numel()] = known

        def block_logits(current: torch.Tensor) -> torch.Tensor:
            nonlocal uncommitted
            inputs = torch.cat([uncommitted, current])
            first = start - uncommitted.numel()
            positions = torch.arange(first, start + B)
            logits = draft(inputs, positions, query_block_causal(first, inputs.numel(), B),
                           num_store=uncommitted.numel())
            uncommitted = current[:0]
            return logits[-B:]

        block, unmasked_at, token_probs, _, _ = denoise_block(
            block_logits, block, params.draft, knobs, generator, mask_id)
        tokens.append(block)
        labels.append(unmasked_at + 1)  # known tokens: -1 + 1 = 0
        if knobs.temperature == 0.0:
            token_probs = torch.nn.functional.one_hot(block, token_probs.shape[-1]).to(token_probs.dtype)
        probs.append(token_probs)
        uncommitted = block  # speculative: committed by the next draft block's first forward
    return torch.cat(tokens), torch.cat(labels), torch.cat(probs)


def verify_round(target: CachedModel, seq, block_start, draft_tokens, labels, params: SimSDParams,
                 mask_id: int) -> torch.Tensor:
    """The target's single verification forward. Returns logits at the mask copies [K * B, V]
    (mask token excluded, as in the target's own denoising)."""
    B, K = params.draft.block_length, params.num_draft_blocks
    uncommitted = seq[len(target):block_start]
    n_u = uncommitted.numel()
    data = draft_tokens.view(K, B)
    region = torch.cat([data, torch.full_like(data, mask_id)], dim=1).flatten()  # [K * 2B]
    data_pos = block_start + torch.arange(K * B).view(K, B)
    copy_pos = data_pos if params.rope_copy else data_pos + B
    region_pos = torch.cat([data_pos, copy_pos], dim=1).flatten()
    kind = torch.tensor([ops.KIND_DATA] * B + [ops.KIND_MASK] * B).repeat(K)  # [K * 2B]
    step = labels.view(K, B).repeat(1, 2).flatten()
    block_idx = torch.arange(K).repeat_interleave(2 * B)
    n_r = region.numel()
    region_mask = ops.ref_token_mask(torch.tensor([0, n_r]), kind, step, block_idx, n_r)
    query_mask = torch.zeros(n_u + n_r, n_u + n_r, dtype=torch.bool)
    query_mask[:n_u, :n_u] = query_block_causal(block_start - n_u, n_u, B)
    query_mask[n_u:, :n_u] = True
    query_mask[n_u:, n_u:] = region_mask
    tokens = torch.cat([uncommitted, region])
    positions = torch.cat([torch.arange(block_start - n_u, block_start), region_pos])
    logits = target(tokens, positions, query_mask, num_store=n_u)[n_u:]  # [K * 2B, V]
    copies = logits.view(K, 2 * B, -1)[:, B:].reshape(K * B, -1)
    return exclude_mask_token(copies, mask_id)


def simsd_generate(
    target_model: SDARModel,
    draft_model: SDARModel | None,
    prompt_ids: list[int] | torch.Tensor,
    *,
    gen_length: int,
    block_length: int | None = None,
    draft_denoising_steps: int | None = None,
    draft_remasking_strategy: str = "low_confidence_dynamic",
    confidence_threshold: float = 0.85,
    eb_threshold: float = 0.35,
    num_draft_blocks: int = 1,
    verification: str = "greedy_match",
    rope_copy: bool = True,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    mask_token_id: int | None = None,
    eos_token_id: int | None = None,
) -> SimSDOutput:
    """SimSD with `draft_model` drafting (None: self-draft, the target drafts for itself)."""
    cfg = target_model.config
    draft_model = target_model if draft_model is None else draft_model
    if draft_model.config.vocab_size != cfg.vocab_size:
        raise ValueError(
            f"draft_model must share the target's vocabulary ({cfg.vocab_size} tokens), "
            f"got {draft_model.config.vocab_size}")
    B = cfg.block_size if block_length is None else block_length
    params = SimSDParams(
        draft=block_params(cfg, B, draft_denoising_steps, draft_remasking_strategy, confidence_threshold,
                           eb_threshold),
        num_draft_blocks=num_draft_blocks,
        verification=verification,
        rope_copy=rope_copy,
    )
    knobs = SamplingKnobs(temperature=temperature, top_k=top_k, top_p=top_p)
    prompt = torch.as_tensor(prompt_ids, dtype=torch.long).flatten()
    mask_id = cfg.mask_token_id if mask_token_id is None else mask_token_id
    eos_id = cfg.eos_token_id if eos_token_id is None else eos_token_id
    _validate(prompt, gen_length, seed, mask_id, cfg.vocab_size)

    generator = torch.Generator().manual_seed(0 if seed is None else seed)
    target, draft = CachedModel(target_model), CachedModel(draft_model)
    seq = prompt.clone()
    out = SimSDOutput([], 0, 0)
    logprobs: list[torch.Tensor] = []  # [len(new), V] per round

    while not is_finished(seq[prompt.numel():].tolist(), gen_length, eos_id):
        block_start = seq.numel() // B * B
        draft_tokens, labels, draft_probs = draft_round(
            draft, seq, block_start, params, knobs, generator, mask_id)
        copy_logits = verify_round(target, seq, block_start, draft_tokens, labels, params, mask_id)
        drafted = labels > 0  # [K * B]: positions the draft decided (known tokens are skipped)
        d_tokens = draft_tokens[drafted][None]  # [1, n]
        n = torch.tensor([d_tokens.shape[1]])
        if params.verification == "greedy_match":
            t_tokens = copy_logits[drafted].argmax(-1)
            t_tokens = torch.cat([t_tokens, t_tokens.new_full((1,), -1)])[None]  # no bonus column
            accepted, next_token = ops.greedy_match(d_tokens, n, t_tokens, n)
        else:
            p_target = sampling_probs(copy_logits[drafted], knobs)  # [n, V]
            p_target = torch.cat([p_target, torch.zeros_like(p_target[:1])])[None]
            accepted, next_token = ops.rejection_sample(
                d_tokens, n, draft_probs[drafted][None], p_target, n,
                torch.rand(1, int(n), generator=generator, dtype=p_target.dtype),
                torch.rand(1, generator=generator, dtype=p_target.dtype))
        a, nxt = int(accepted), int(next_token)
        new = d_tokens[0, :a]
        if nxt >= 0:
            new = torch.cat([new, torch.tensor([nxt])])
        seq = torch.cat([seq, new])
        # the accepted tokens and the correction / bonus sit at drafted ranks 0 .. len(new) - 1
        logprobs.append(copy_logits[drafted][: new.numel()].float().log_softmax(-1))
        out.drafted_per_round.append(int(n))
        out.accepted_per_round.append(a)
        # keep the draft's speculative KV only for draft blocks that were accepted whole
        drafted_upto = drafted.view(-1, B).sum(1).cumsum(0)  # [K] drafted tokens through block k
        whole_blocks = int((drafted_upto <= a).sum())
        draft.cache.truncate(min(len(draft), block_start + whole_blocks * B))

    generated = seq[prompt.numel():].tolist()
    out.tokens = generated[: output_length(generated, gen_length, eos_id)]
    out.logprobs = torch.cat(logprobs)[: len(out.tokens)]
    out.target_forwards, out.draft_forwards = target.forwards, draft.forwards
    return out
