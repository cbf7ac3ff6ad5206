"""Region attention shared by SimSD, PSD (and Spiffy): verify rows with their own mask, on vLLM's
paged KV cache (CPU).

A SimSD verify step feeds each request `[uncommitted full blocks | data_0 | copies_0 | ...]`.
The uncommitted blocks (and every non-SimSD token) go through the project's block-causal path
(`vllm_dllm_spec.attention`, the CPU kernel). The verify REGION (`data_k | copies_k`, 2KB
tokens per request, starting at the in-progress block) needs the reference-token mask, which
the kernel cannot express; `RegionAttentionImpl.forward` therefore recomputes the region rows,
batched over requests with no per-token Python loop:

    keys = [cached prefix (positions < block_start, read from the paged cache, the uncommitted
            blocks of this step included: vLLM writes KV before attention) | region keys]
    mask = [all prefix visible | ops.ref_token_mask(...)]

and overwrites the kernel's output rows of the region. The region's own KV is written to the
cache by vLLM at its (sequential) slots; those slots lie after the committed prefix and are
re-fed next round, never hashed for prefix caching (they are spec tokens).

The step's layout is published by the runner in `CURRENT` (module state of this process, set
before the model forward and cleared after it). PSD's verify step uses the same fix-up with a
block-diagonal region mask (one block copy per drafted state; `vllm_dllm_spec.psd.runner`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl


@dataclass
class VerifyLayout:
    region_index: torch.Tensor  # [R, Q] flat token index of every region token
    prefix_slots: torch.Tensor  # [R, L] cache slot of every prefix position (padded with 0)
    prefix_valid: torch.Tensor  # [R, L] bool
    region_mask: torch.Tensor  # [R, Q, Q] bool: ref_token_mask per request


CURRENT: VerifyLayout | None = None


def cache_slots(block_tables: torch.Tensor, positions: torch.Tensor, cache_block_size: int) -> torch.Tensor:
    """block_tables [R, max_blocks], positions [R, P] -> paged-cache slots [R, P]."""
    return block_tables.gather(1, positions // cache_block_size) * cache_block_size + positions % cache_block_size


def prefix_layout(block_tables: torch.Tensor, block_starts: torch.Tensor, cache_block_size: int):
    """The cached prefix every region row sees: positions < block_starts[r] of request r.
    Returns (slots [R, L], valid [R, L]); slots past a request's prefix are masked by valid."""
    L = max(1, int(block_starts.max()))
    prefix = torch.arange(L).expand(len(block_starts), L)  # [R, L]
    return cache_slots(block_tables.long(), prefix, cache_block_size), prefix < block_starts[:, None]


class RegionAttentionImpl(CPUAttentionBackendImpl):
    """CPU attention impl whose region rows follow the step's region mask (class swapped in on the
    target's attention layers by the SimSD / PSD runners)."""

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):
        out = super().forward(layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs)
        lay = CURRENT
        if lay is None or attn_metadata is None or lay.region_index.numel() == 0:
            return out
        if getattr(layer, "isa", "vec") != "vec":
            raise NotImplementedError(
                f"region attention reads the CPU KV cache in the 'vec' layout, got {layer.isa!r}")
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_size
        R, Q = lay.region_index.shape
        nb, _, bs, _ = kv_cache.shape
        # 'vec' layout: keys [nb, Hkv, D, bs] (transposed block interior), values [nb, Hkv, bs, D]
        k_cache = kv_cache.view(nb, Hkv, 2, bs * D)[:, :, 0].view(nb, Hkv, D, bs)
        v_cache = kv_cache.view(nb, Hkv, 2 * bs, D)[:, :, bs:]
        blk, off = lay.prefix_slots // bs, lay.prefix_slots % bs  # [R, L]
        pk = k_cache[blk, :, :, off]  # [R, L, Hkv, D]
        pv = v_cache[blk, :, off, :]  # [R, L, Hkv, D]
        idx = lay.region_index.reshape(-1)
        q = query.view(-1, H, D)[idx].view(R, Q, H, D).transpose(1, 2)  # [R, H, Q, D]
        rk = key.view(-1, Hkv, D)[idx].view(R, Q, Hkv, D)
        rv = value.view(-1, Hkv, D)[idx].view(R, Q, Hkv, D)
        keys = torch.cat([pk, rk], dim=1).transpose(1, 2).repeat_interleave(H // Hkv, dim=1)
        vals = torch.cat([pv, rv], dim=1).transpose(1, 2).repeat_interleave(H // Hkv, dim=1)
        L = pk.shape[1]
        mask = torch.cat([lay.prefix_valid[:, None, :].expand(R, Q, L), lay.region_mask], dim=2)
        scores = (q.float() @ keys.float().transpose(-1, -2)) * self.scale  # [R, H, Q, L + Q]
        scores = scores.masked_fill(~mask[:, None], float("-inf"))
        res = (scores.softmax(-1) @ vals.float()).to(output.dtype)  # [R, H, Q, D]
        out_view = output.view(-1, H, D)
        out_view[idx] = res.transpose(1, 2).reshape(R * Q, H, D)
        return out


def install_region_attention(model) -> None:
    """Swaps `RegionAttentionImpl` in on every CPU attention layer of the target model."""
    from vllm.model_executor.layers.attention import Attention

    n = 0
    for module in model.modules():
        if isinstance(module, Attention) and isinstance(module.impl, CPUAttentionBackendImpl):
            module.impl.__class__ = RegionAttentionImpl
            n += 1
    if n == 0:
        raise RuntimeError("found no CPU attention layer to install the verify-region attention on")
