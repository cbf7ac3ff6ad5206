"""PSD-style self-speculative block diffusion, pure PyTorch, greedy: the oracle.

Plain block diffusion takes one forward per denoising step: step s needs the logits of state
S_s to choose S_{s+1}. Here one forward's logits also *draft* the following steps: from the
logits of S (the known state), the remasking policy picks S_1 exactly, then keeps applying the
same policy to the same logits (as if predictions did not move) for the drafts S_2' .. S_D'.
ONE verification forward evaluates every draft state that still has masks (each a copy of the
block over the same cached prefix; a batched engine runs them as one pass, this oracle runs each
copy alone so its logits equal plain decoding's bit for bit). Hierarchical acceptance keeps the
deepest draft whose whole chain is what the policy picks from the verified logits
(S_{i+1}' == policy(S_i, logits(S_i))); its logits start the next chain.

Lossless by construction: every accepted state is the state plain greedy block diffusion
reaches, so tokens and step_map equal `generate(..., fuse_commit=True)` for every remasking
strategy; only the number of forwards drops (`tests/test_psd_reference.py`). Greedy only: with
sampling, "the same draw" is not defined across states.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vllm_dllm_spec.config import SamplingKnobs
from vllm_dllm_spec.reference.generate import (
    _validate,
    block_causal_mask,
    block_params,
    exclude_mask_token,
    is_finished,
    output_length,
    predict,
    select_to_unmask,
)
from vllm_dllm_spec.reference.model import KVCache, SDARModel

GREEDY = SamplingKnobs(temperature=0.0, top_k=0, top_p=1.0)


@dataclass
class PSDOutput:
    tokens: list[int]  # equal to generate(..., fuse_commit=True).tokens
    step_map: list[int]  # equal to generate(..., fuse_commit=True).step_map
    num_forwards: int  # prefill/commit-fused first forwards + verification forwards
    num_state_evals: int  # block copies evaluated (a verification forward holds several)
    accepted_per_verification: list[int] = field(default_factory=list)  # steps each advanced
    # [len(tokens), V]: per token the log-softmax of the logits of the state it was unmasked from
    # (mask excluded), i.e. plain decoding's step: equal to generate(..., fuse_commit=True).logprobs
    logprobs: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0))


def policy_step(params, step, block, logits, mask_id):
    """One plain denoising step: (next block [B], positions it unmasked [B] bool)."""
    token, confidence, entropy, _ = predict(exclude_mask_token(logits, mask_id), GREEDY, None)
    chosen = select_to_unmask(params, step, block == mask_id, confidence, entropy)
    return torch.where(chosen, token, block), chosen


def draft_chain(params, step, block, logits, depth, mask_id):
    """The policy applied again and again to logits(S) for S = block (at denoising step `step`):
    states S_1 (exact) .. S_depth' (drafts), stopping at a state without masks. Returns (chain,
    chosen): the states [B] and what each transition unmasked [B] bool."""
    chain, chosen = [], []
    state = block
    for i in range(depth):
        if not bool((state == mask_id).any()):
            break
        state, unmasked = policy_step(params, step + i, state, logits, mask_id)
        chain.append(state)
        chosen.append(unmasked)
    return chain, chosen


def accepted_depth(params, step, chain, verified, mask_id) -> int:
    """Hierarchical acceptance: the first state is exact; state i + 1 stands iff the policy on
    state i's verified logits (verified[i - 1], for the states that have masks) picks it."""
    accepted = 1
    while accepted < len(chain):
        expected, _ = policy_step(params, step + accepted, chain[accepted - 1], verified[accepted - 1], mask_id)
        if not torch.equal(expected, chain[accepted]):
            break
        accepted += 1
    return accepted


def state_evaluator(model: SDARModel, cache: KVCache, out: "PSDOutput", B: int):
    """forward(tokens [n], num_store) -> the logits [B, V] of the block state ending `tokens`
    (uncommitted tokens + one state, at the cache's next positions); counts `out.num_state_evals`.
    Shared by the PSD and Spiffy oracles: one block copy evaluated = one call."""

    def block_forward(tokens: torch.Tensor, num_store: int) -> torch.Tensor:
        start = len(cache)
        positions = torch.arange(start, start + tokens.numel())
        mask = block_causal_mask(start, tokens.numel(), B)
        with torch.no_grad():
            logits = model(tokens[None], positions[None], mask[None], cache, num_store)
        out.num_state_evals += 1
        return logits[0, -B:]

    return block_forward


def split_prompt(prompt: torch.Tensor, B: int, mask_id: int):
    """(uncommitted whole blocks of the prompt, the first block state [B] (the prompt's leftover
    then masks), index of its first generated position)."""
    num_prefill = prompt.numel() // B * B
    leftover = prompt[num_prefill:]
    block = torch.cat([leftover, torch.full((B - leftover.numel(),), mask_id)])  # [B]
    return prompt[:num_prefill], block, leftover.numel()


def psd_generate(
    model: SDARModel,
    prompt_ids: list[int] | torch.Tensor,
    *,
    gen_length: int,
    draft_depth: int = 3,
    block_length: int | None = None,
    denoising_steps: int | None = None,
    remasking_strategy: str = "low_confidence_dynamic",
    confidence_threshold: float = 0.85,
    eb_threshold: float = 0.35,
    mask_token_id: int | None = None,
    eos_token_id: int | None = None,
) -> PSDOutput:
    cfg = model.config
    if not isinstance(draft_depth, int) or isinstance(draft_depth, bool) or draft_depth < 1:
        raise ValueError(f"draft_depth must be an integer >= 1, got {draft_depth!r}")
    params = block_params(cfg, block_length, denoising_steps, remasking_strategy, confidence_threshold,
                          eb_threshold)
    prompt = torch.as_tensor(prompt_ids, dtype=torch.long).flatten()
    mask_id = cfg.mask_token_id if mask_token_id is None else mask_token_id
    eos_id = cfg.eos_token_id if eos_token_id is None else eos_token_id
    _validate(prompt, gen_length, None, mask_id, cfg.vocab_size)

    B = params.block_length
    cache = KVCache(cfg.num_hidden_layers)
    out = PSDOutput(tokens=[], step_map=[], num_forwards=0, num_state_evals=0)

    block_forward = state_evaluator(model, cache, out, B)
    uncommitted, block, first_generated = split_prompt(prompt, B, mask_id)
    logprobs: list[torch.Tensor] = []  # [n_i, V] per block
    while True:
        # the block's first forward: the previous block's (or the prompt's) commit fused in
        out.num_forwards += 1
        logits = block_forward(torch.cat([uncommitted, block]), uncommitted.numel())  # [B, V]
        unmasked_at = torch.full((B,), -1)
        block_logprobs = torch.zeros_like(logits, dtype=torch.float32)  # [B, V]
        step = 0
        while bool((block == mask_id).any()):
            chain, chosen_at = draft_chain(params, step, block, logits, draft_depth, mask_id)
            # one verification forward over every draft state that still has masks
            open_states = [s for s in chain if bool((s == mask_id).any())]
            if open_states:
                out.num_forwards += 1
            verified = [block_forward(s, 0) for s in open_states]
            accepted = accepted_depth(params, step, chain, verified, mask_id)
            for i in range(accepted):
                unmasked_at[chosen_at[i]] = step + i
                # transition i was decided by the logits of the state before it: S's own for the
                # first, the verified logits of chain state i - 1 after that
                source = logits if i == 0 else verified[i - 1]
                lp = exclude_mask_token(source, mask_id).float().log_softmax(-1)
                block_logprobs[chosen_at[i]] = lp[chosen_at[i]]
            block = chain[accepted - 1]
            step += accepted
            if verified:
                out.accepted_per_verification.append(accepted)
            if accepted <= len(verified):
                logits = verified[accepted - 1]
        out.tokens += block[first_generated:].tolist()
        out.step_map += unmasked_at[first_generated:].tolist()
        logprobs.append(block_logprobs[first_generated:])
        first_generated = 0
        uncommitted = block
        if is_finished(out.tokens, gen_length, eos_id):
            break
        block = torch.full((B,), mask_id)

    keep = output_length(out.tokens, gen_length, eos_id)
    out.tokens, out.step_map = out.tokens[:keep], out.step_map[:keep]
    out.logprobs = torch.cat(logprobs)[:keep]
    return out
