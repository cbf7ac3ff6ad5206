"""The in-progress block of every live PSD / Spiffy request as rows of tensors (one slot per
request), so that a step's bookkeeping is a few batched ops over the step's slots instead of a
Python loop over requests.

A slot holds: the exact block state S and its denoising step, the block's position, the step
that unmasked each position, the states the next forward evaluates (`chain`: PSD's drafted
chain S_1 .., Spiffy's [S, open drafts ..]; `chain_len` of them, 0 before S's first forward),
and the request's remasking policy as a row of a `walk.PolicyTable`. Python-side per slot: the
request's knobs (sampling, logprobs) and, for logprob requests only, the logprobs gathered so far.
"""
from __future__ import annotations

import torch

from vllm_dllm_spec.config import REMASKING_STRATEGIES, DenoiseParams, SamplingKnobs
from vllm_dllm_spec.walk import PolicyTable


class BlockSlots:
    def __init__(self, block_length: int, num_copies: int, mask_id: int, capacity: int = 8):
        self.B, self.C, self.mask_id = block_length, num_copies, mask_id
        self.slot_of: dict[str, int] = {}
        self.free: list[int] = []
        self.knobs: list[SamplingKnobs | None] = []
        self.num_logprobs: list[int | None] = []
        # logprob requests only: slot -> per position of the block, its logprobs from the step
        # that unmasked it (ids [B, k+1], values, ranks [B]), and the logits [B, V] the chain
        # was drafted from
        self.block_logprobs: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.chain_logits: dict[int, torch.Tensor] = {}
        B, C = block_length, num_copies
        self.block = torch.zeros((0, B), dtype=torch.int64)  # [S, B] the exact state S
        self.step = torch.zeros(0, dtype=torch.int64)  # [S] denoising steps S has taken
        self.block_start = torch.zeros(0, dtype=torch.int64)  # [S] -1: the next step starts a block
        self.unmasked_at = torch.zeros((0, B), dtype=torch.int64)  # [S, B] -1: not yet
        self.chain = torch.zeros((0, C, B), dtype=torch.int64)  # [S, C, B]
        self.chain_len = torch.zeros(0, dtype=torch.int64)  # [S]
        # policy rows; transfer [S, B + 1]: a block takes at most B steps, the last column (1) is
        # past every schedule (walk.PolicyTable's convention)
        self.strategy = torch.zeros(0, dtype=torch.int64)
        self.threshold = torch.zeros(0, dtype=torch.float32)
        self.eb_threshold = torch.zeros(0, dtype=torch.float32)
        self.transfer = torch.zeros((0, B + 1), dtype=torch.int64)
        self.greedy = torch.zeros(0, dtype=torch.bool)
        self.logprobs = torch.zeros(0, dtype=torch.bool)  # [S] the request asked for logprobs
        self._grow(capacity)

    def _grow(self, capacity: int) -> None:
        old = self.block.shape[0]
        extra = capacity - old

        def cat(t: torch.Tensor, fill) -> torch.Tensor:
            return torch.cat([t, torch.full((extra, *t.shape[1:]), fill, dtype=t.dtype)])

        self.block, self.step, self.block_start = cat(self.block, 0), cat(self.step, 0), cat(self.block_start, -1)
        self.unmasked_at, self.chain, self.chain_len = cat(self.unmasked_at, -1), cat(self.chain, 0), cat(self.chain_len, 0)
        self.strategy, self.threshold = cat(self.strategy, 0), cat(self.threshold, 0.0)
        self.eb_threshold, self.transfer, self.greedy = cat(self.eb_threshold, 0.0), cat(self.transfer, 1), cat(self.greedy, True)
        self.logprobs = cat(self.logprobs, False)
        self.knobs += [None] * extra
        self.num_logprobs += [None] * extra
        self.free += range(capacity - 1, old - 1, -1)  # lowest slot first

    def add(self, rid: str, params: DenoiseParams, knobs: SamplingKnobs, num_logprobs: int | None) -> int:
        if not self.free:
            self._grow(2 * self.block.shape[0])
        s = self.slot_of[rid] = self.free.pop()
        self.block_start[s] = -1
        self.strategy[s] = REMASKING_STRATEGIES.index(params.remasking_strategy)
        self.threshold[s], self.eb_threshold[s] = params.confidence_threshold, params.eb_threshold
        counts = params.num_transfer_tokens()
        self.transfer[s] = 1
        self.transfer[s, : len(counts)] = torch.tensor(counts)
        self.greedy[s] = knobs.temperature == 0.0
        self.knobs[s], self.num_logprobs[s] = knobs, num_logprobs
        self.logprobs[s] = num_logprobs is not None
        return s

    def release(self, rids) -> None:
        for rid in rids:
            s = self.slot_of.pop(rid, None)
            if s is not None:
                self.block_logprobs.pop(s, None)
                self.chain_logits.pop(s, None)
                self.free.append(s)

    def policy(self, slots: torch.Tensor) -> PolicyTable:
        """The remasking policy of `slots` [R] as a PolicyTable with one row each."""
        return PolicyTable(self.strategy[slots], self.threshold[slots], self.eb_threshold[slots],
                           self.transfer[slots])

    def _live(self, slots: torch.Tensor, chain: torch.Tensor) -> torch.Tensor:
        """[R] how many of the chain's states (chain = self.chain[slots], [R, C, B]) still have
        masks (a prefix of it)."""
        return ((torch.arange(self.C) < self.chain_len[slots, None]) & (chain == self.mask_id).any(-1)).sum(1)

    def num_copies(self, slots: torch.Tensor) -> torch.Tensor:
        """[R] the copies the next forward evaluates (`copies`' count) without building them."""
        return self._live(slots, self.chain[slots]).clamp(min=1)

    def copies(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What the next forward evaluates: the chain's states that still have masks (a prefix
        of it), else S alone, padded by repeating the last -> (copies [R, C, B], count [R])."""
        chain, block = self.chain[slots], self.block[slots]  # [R, C, B], [R, B]
        count = self._live(slots, chain)  # [R]
        chain = torch.where((count > 0)[:, None, None], chain, block[:, None, :])
        pick = torch.minimum(torch.arange(self.C)[None, :], (count.clamp(min=1) - 1)[:, None])  # [R, C]
        return chain.gather(1, pick[..., None].expand(-1, -1, self.B)), count.clamp(min=1)
