"""Spiffy's draft states for all drafting requests of a step at once: `reference.spiffy.instantiate`
(the oracle, one request at a time) as tensor ops over [K requests, N formulas, B positions].

The ranks a formula refers to come from the stale logits the root was decided from: positions in
the remasking policy's priority (`priority_order`, from the greedy prediction's confidence /
entropy, which are that distribution's max probability / entropy) and tokens by probability
(`ranked_tokens`); `open_drafts` applies every formula to every root and keeps what `instantiate`
keeps, the open states only (the ones a verify copy evaluates).
"""
from __future__ import annotations

import torch

from vllm_dllm_spec.denoise import ENTROPY, SEQUENTIAL
from vllm_dllm_spec.reference.spiffy import DraftGraph


def priority_order(is_mask: torch.Tensor, strategy: torch.Tensor, confidence: torch.Tensor,
                   entropy: torch.Tensor) -> torch.Tensor:
    """is_mask / confidence / entropy [K, B] (read at masks only), strategy [K] codes -> positions
    [K, B] in each request's policy priority, its masked positions first: sequential left to
    right, low_confidence_* by confidence descending, entropy_bounded by entropy ascending, ties
    to the lower position (`reference.spiffy.priority_order`; descending by confidence is
    ascending by its negation, a stable sort keeping the lower position first either way)."""
    s = strategy[:, None]
    key = torch.where(s == SEQUENTIAL, 0.0, torch.where(s == ENTROPY, entropy, -confidence))  # [K, B]
    return key.masked_fill(~is_mask, float("inf")).argsort(dim=1, stable=True)


def ranked_tokens(probs: torch.Tensor, num_ranks: int) -> torch.Tensor:
    """probs [M, V] -> the num_ranks most probable tokens [M, num_ranks], ties to the lower id:
    the first columns of a stable descending sort, by repeated first-maximum argmax (probs >= 0,
    so -1 retires a picked token) instead of sorting all V."""
    left = probs.clone()
    ranked = []
    for _ in range(num_ranks):
        top = left.argmax(-1, keepdim=True)  # [M, 1] the first maximum
        ranked.append(top)
        left.scatter_(1, top, -1.0)
    return torch.cat(ranked, 1)


def open_drafts(root: torch.Tensor, order: torch.Tensor, tokens: torch.Tensor, graph: DraftGraph, mask_id: int,
                budget: int) -> tuple[torch.Tensor, torch.Tensor]:
    """root [K, B] (each with a mask), order [K, B] (`priority_order`), tokens [K, B, J] (the
    stale ranks at each masked position, J = max(1, min(graph's top token rank, V - 1))) -> the
    open states `instantiate` returns for each root, in graph order, at most budget - 1:
    drafts [K, budget - 1, B] (root after the last), count [K]."""
    K, B = root.shape
    J = tokens.shape[2]
    pos_rank, tok_rank = graph._pos_rank, graph._tok_rank  # [N, F]
    N, F = pos_rank.shape
    drafts = root[:, None, :].repeat(1, budget - 1, 1)  # [K, budget - 1, B]
    count = torch.zeros(K, dtype=torch.int64)
    if N == 0 or budget == 1:
        return drafts, count
    num_masks = (root == mask_id).sum(1)  # [K]
    pad = pos_rank == 0  # [N, F]
    in_range = (pos_rank[None] <= num_masks[:, None, None]) & (tok_rank <= J)[None]  # [K, N, F]
    valid = graph._distinct[None] & (in_range | pad[None]).all(-1)  # [K, N]
    # an invalid formula's state is built from clamped ranks and dropped
    pos = order[:, (pos_rank - 1).clamp(0, B - 1)]  # [K, N, F]
    pos = torch.where(pad[None], B, pos)  # B: a scratch column for the padding pairs
    tok = tokens[torch.arange(K)[:, None, None], pos.clamp(max=B - 1), (tok_rank - 1).clamp(0, J - 1)[None]]
    states = torch.cat([root, root.new_zeros(K, 1)], 1)[:, None, :].repeat(1, N, 1)  # [K, N, B + 1]
    states.scatter_(2, pos, tok)  # a valid formula's positions are distinct
    states = states[:, :, :B]  # [K, N, B]
    same = (states[:, :, None, :] == states[:, None, :, :]).all(-1)  # [K, N, N]
    earlier = torch.ones((N, N), dtype=torch.bool).tril(-1)
    duplicate = (same & earlier & valid[:, None, :]).any(-1)  # [K, N] equal to an earlier valid state
    keep = valid & ~duplicate & (states != root[:, None, :]).any(-1)
    is_open = (states == mask_id).any(-1)  # [K, N]
    opened = keep & is_open & ((keep & is_open).cumsum(1) <= budget - 1)  # [K, N]
    k, n = opened.nonzero(as_tuple=True)
    drafts[k, opened.cumsum(1)[k, n] - 1] = states[k, n]
    return drafts, opened.sum(1)
