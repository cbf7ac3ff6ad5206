"""SDAR block-diffusion generation, pure PyTorch, one prompt at a time: the oracle.

Semantics (docs/ARCHITECTURE.md, "Reference semantics"):
- Blocks are aligned to multiples of B in position. The prompt's full blocks
  (prompt_len // B * B tokens) are prefilled block-causally; the leftover prompt tokens start
  the first block, which is padded with mask tokens to B.
- A denoising step is one forward over the current block (bidirectional inside it, attending
  to the cached prefix), after which some masks are replaced. Prompt tokens never change.
- When no mask is left, the block's KV is committed: a separate forward (SDAR's own loop), or,
  with `fuse_commit`, inside the next block's first denoising forward (block-causal over both;
  the prefill fuses the same way). The last block is then never committed (nothing reads it).
- Generation stops after the block that holds eos or reaches gen_length; the output is cut
  right after the first eos and at gen_length.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vllm_dllm_spec.config import DenoiseParams, SamplingKnobs
from vllm_dllm_spec.reference.model import KVCache, SDARModel


@dataclass
class GenerateOutput:
    tokens: list[int]  # generated ids, cut after the first eos and at gen_length
    step_map: list[int]  # per generated token: 0-based denoising step (in its block) that unmasked it
    num_forwards: int  # model forwards, prefill and commits included
    block_steps: list[int] = field(default_factory=list)  # denoising forwards of each block
    # [len(tokens), V] per generated token: the log-softmax of the logits it was committed from
    # (the denoising step that unmasked it; mask token excluded: -inf), untempered (vLLM's
    # default "raw_logprobs"): what `logprobs` / `top_logprobs` report
    logprobs: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0))


def block_causal_mask(num_cached: int, num_query: int, block_length: int) -> torch.Tensor:
    """[num_query, num_cached + num_query] bool: query at position q may see key at position k
    iff k's block is not after q's block (block = position // block_length)."""
    q_block = torch.arange(num_cached, num_cached + num_query) // block_length
    k_block = torch.arange(num_cached + num_query) // block_length
    return k_block[None, :] <= q_block[:, None]


def exclude_mask_token(logits: torch.Tensor, mask_id: int) -> torch.Tensor:
    """The mask token is never a prediction: its logit becomes -inf before any processing (a
    model can rank it first, and "unmasking" a position to the mask token would never end)."""
    logits = logits.clone()
    logits[..., mask_id] = float("-inf")
    return logits


def predict(logits: torch.Tensor, knobs: SamplingKnobs, generator: torch.Generator):
    """logits [B, V] (mask token already excluded) -> (token [B], confidence [B], entropy [B],
    probs [B, V]).

    Greedy: argmax, confidence = untempered softmax probability of it. Sampling: logits / T,
    top_k, top_p, sample; confidence = the sampled token's probability under that distribution.
    probs is the distribution the token was taken from (speculative sampling needs it).
    """
    if knobs.temperature == 0.0:
        probs = logits.float().softmax(-1)
        token = probs.argmax(-1)
    else:
        probs = filter_top_k_top_p(logits.float() / knobs.temperature, knobs.top_k, knobs.top_p).softmax(-1)
        token = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    confidence = probs.gather(-1, token[:, None]).squeeze(-1)
    entropy = torch.special.entr(probs).sum(-1)
    return token, confidence, entropy, probs


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Sets filtered-out logits to -inf. top_k 0 / top_p 1.0 are off. logits: [B, V]."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True, stable=True)
        sorted_probs = sorted_logits.softmax(-1)
        mass_before = sorted_probs.cumsum(-1) - sorted_probs
        drop_sorted = mass_before > top_p  # keeps the smallest prefix reaching top_p, >= 1 token
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def select_to_unmask(
    params: DenoiseParams,
    step: int,
    is_mask: torch.Tensor,  # [B] bool
    confidence: torch.Tensor,  # [B]
    entropy: torch.Tensor,  # [B]
) -> torch.Tensor:  # [B] bool, a non-empty subset of is_mask
    num_masks = int(is_mask.sum())
    strategy = params.remasking_strategy
    if strategy == "entropy_bounded":
        ent = entropy.masked_fill(~is_mask, float("inf"))
        order = ent.argsort(stable=True)[:num_masks]
        within = ent[order].cumsum(0) <= params.eb_threshold
        count = max(1, int(within.sum()))
        return _positions_to_mask(order[:count], is_mask)
    counts = params.num_transfer_tokens()
    if step >= len(counts):
        raise AssertionError(f"{strategy} left masks after {len(counts)} steps")
    k = min(counts[step], num_masks)
    if strategy == "sequential":
        order = torch.nonzero(is_mask).squeeze(-1)
    else:
        # most confident first; equal confidence -> lower position first (stable sort)
        order = confidence.masked_fill(~is_mask, float("-inf")).argsort(descending=True, stable=True)
    top_k = _positions_to_mask(order[:k], is_mask)
    if strategy == "low_confidence_dynamic":
        confident = is_mask & (confidence > params.confidence_threshold)
        if int(confident.sum()) >= k:
            return confident
    return top_k


def _positions_to_mask(positions: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(like)
    out[positions] = True
    return out


def denoise_block(
    block_logits,  # callable: block [B] -> logits [B, V] (one model forward)
    block: torch.Tensor,  # [B] known tokens and mask_id
    params: DenoiseParams,
    knobs: SamplingKnobs,
    generator: torch.Generator,
    mask_id: int,
):
    """Runs denoising steps until no mask is left. Returns (block [B], unmasked_at [B]: 0-based
    step that unmasked each position, -1 for tokens known before; probs [B, V]: the distribution
    each token was taken from, zeros for known tokens; number of steps; logprobs [B, V]: the
    log-softmax of the logits each token was unmasked from, zeros for known tokens)."""
    unmasked_at = torch.full(block.shape, -1)  # [B]
    token_probs = token_logprobs = None
    step = 0
    while bool((block == mask_id).any()):
        logits = exclude_mask_token(block_logits(block), mask_id)
        token, confidence, entropy, probs = predict(logits, knobs, generator)
        if token_probs is None:
            token_probs = torch.zeros_like(probs)  # [B, V]
            token_logprobs = torch.zeros_like(probs)  # [B, V]
        chosen = select_to_unmask(params, step, block == mask_id, confidence, entropy)
        block = torch.where(chosen, token, block)
        unmasked_at[chosen] = step
        token_probs[chosen] = probs[chosen]
        token_logprobs[chosen] = logits.float().log_softmax(-1)[chosen]
        step += 1
    return block, unmasked_at, token_probs, step, token_logprobs


def generate(
    model: SDARModel,
    prompt_ids: list[int] | torch.Tensor,
    *,
    gen_length: int,
    block_length: int | None = None,
    denoising_steps: int | None = None,
    remasking_strategy: str = "low_confidence_dynamic",
    confidence_threshold: float = 0.85,
    eb_threshold: float = 0.35,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    fuse_commit: bool = False,
    mask_token_id: int | None = None,
    eos_token_id: int | None = None,
) -> GenerateOutput:
    cfg = model.config
    params = block_params(cfg, block_length, denoising_steps, remasking_strategy, confidence_threshold,
                          eb_threshold)
    knobs = SamplingKnobs(temperature=temperature, top_k=top_k, top_p=top_p)
    prompt = torch.as_tensor(prompt_ids, dtype=torch.long).flatten()
    mask_id = cfg.mask_token_id if mask_token_id is None else mask_token_id
    eos_id = cfg.eos_token_id if eos_token_id is None else eos_token_id
    _validate(prompt, gen_length, seed, mask_id, cfg.vocab_size)

    B = params.block_length
    generator = torch.Generator().manual_seed(0 if seed is None else seed)
    cache = KVCache(cfg.num_hidden_layers)
    num_forwards = 0

    def forward(tokens: torch.Tensor, num_store: int) -> torch.Tensor:
        nonlocal num_forwards
        num_forwards += 1
        start = len(cache)
        positions = torch.arange(start, start + tokens.numel())
        mask = block_causal_mask(start, tokens.numel(), B)
        with torch.no_grad():
            logits = model(tokens[None], positions[None], mask[None], cache, num_store)
        return logits[0]  # [num_tokens, vocab]

    num_prefill = prompt.numel() // B * B
    uncommitted = prompt[:num_prefill]  # tokens whose KV is not in the cache yet
    if not fuse_commit and num_prefill:
        forward(uncommitted, num_store=num_prefill)
        uncommitted = prompt[:0]

    leftover = prompt[num_prefill:]
    block = torch.cat([leftover, torch.full((B - leftover.numel(),), mask_id)])  # [B]
    first_generated = leftover.numel()  # in-block index of the first generated token
    tokens: list[int] = []
    step_map: list[int] = []
    block_steps: list[int] = []
    logprobs: list[torch.Tensor] = []  # [n_i, V] per block
    while True:

        def block_logits(current: torch.Tensor) -> torch.Tensor:
            nonlocal uncommitted
            inputs = torch.cat([uncommitted, current]) if fuse_commit else current
            logits = forward(inputs, num_store=uncommitted.numel() if fuse_commit else 0)[-B:]
            if fuse_commit:
                uncommitted = prompt[:0]
            return logits

        block, unmasked_at, _, steps, block_logprobs = denoise_block(
            block_logits, block, params, knobs, generator, mask_id)
        block_steps.append(steps)
        logprobs.append(block_logprobs[first_generated:])
        tokens += block[first_generated:].tolist()
        step_map += unmasked_at[first_generated:].tolist()
        first_generated = 0
        if fuse_commit:
            uncommitted = block
        else:
            forward(block, num_store=B)
        if is_finished(tokens, gen_length, eos_id):
            break
        block = torch.full((B,), mask_id)

    keep = output_length(tokens, gen_length, eos_id)
    return GenerateOutput(tokens[:keep], step_map[:keep], num_forwards, block_steps,
                          torch.cat(logprobs)[:keep])


def block_params(cfg, block_length, denoising_steps, remasking_strategy, confidence_threshold,
                 eb_threshold) -> DenoiseParams:
    """The oracles' denoising knobs (block length default: the model's; steps: the block's)."""
    block_length = cfg.block_size if block_length is None else block_length
    return DenoiseParams(
        block_length=block_length,
        denoising_steps=block_length if denoising_steps is None else denoising_steps,
        remasking_strategy=remasking_strategy,
        confidence_threshold=confidence_threshold,
        eb_threshold=eb_threshold,
    )


def is_finished(generated: list[int], gen_length: int, eos_id: int | None) -> bool:
    return len(generated) >= gen_length or (eos_id is not None and eos_id in generated[:gen_length])


def output_length(generated: list[int], gen_length: int, eos_id: int | None) -> int:
    """The output is cut right after the first eos and at gen_length."""
    if eos_id is not None and eos_id in generated[:gen_length]:
        return generated.index(eos_id) + 1
    return min(gen_length, len(generated))


def _validate(prompt: torch.Tensor, gen_length, seed, mask_id, vocab_size: int) -> None:
    if prompt.numel() == 0:
        raise ValueError("prompt_ids must hold at least one token")
    if int(prompt.min()) < 0 or int(prompt.max()) >= vocab_size:
        raise ValueError(f"prompt_ids must be token ids in [0, {vocab_size}), got {prompt.tolist()}")
    if not isinstance(gen_length, int) or isinstance(gen_length, bool) or gen_length < 1:
        raise ValueError(f"gen_length must be an integer >= 1, got {gen_length!r}")
    if seed is not None and not isinstance(seed, int):
        raise ValueError(f"seed must be an integer or None, got {seed!r}")
    if mask_id is None or not 0 <= int(mask_id) < vocab_size:
        raise ValueError(
            f"mask_token_id must be a token id in [0, {vocab_size}) (from the model config or "
            f"the argument), got {mask_id!r}"
        )
