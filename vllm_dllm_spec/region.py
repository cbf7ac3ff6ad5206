"""Region attention shared by SimSD, PSD (and Spiffy): verify rows with their own mask, on vLLM's
paged KV cache (CPU_ATTN, FLASH_ATTN and TRITON_ATTN).

A SimSD verify step feeds each request `[uncommitted full blocks | data_0 | copies_0 | ...]`.
The uncommitted blocks (and every non-SimSD token) go through the project's block-causal path
(`vllm_dllm_spec.attention`, the platform's kernel). The verify REGION (`data_k | copies_k`, 2KB
tokens per request, starting at the in-progress block) needs the reference-token mask, which
the kernels cannot express; `RegionAttentionMixin.forward` (mixed over the layer's own impl
class by `install_region_attention`) therefore recomputes the region rows,
batched over requests with no per-token Python loop:

    keys = [cached prefix (positions < block_start, read from the paged cache, the uncommitted
            blocks of this step included: vLLM writes KV before attention) | region keys]
    mask = [all prefix visible | ops.ref_token_mask(...)]

and overwrites the kernel's output rows of the region. The region's own KV is written to the
cache by vLLM at its (sequential) slots; those slots lie after the committed prefix and are
re-fed next round, never hashed for prefix caching (they are spec tokens).

The prefix keys are read from the paged cache through one reader, `read_prefix_kv`, that knows
the CPU 'vec' layout and the FA/Triton layout. The step's layout is published by the runner in
`CURRENT` (module state of this process, on the runner's device, set before the model forward
and cleared after it). PSD's verify step uses the same fix-up with a
block-diagonal region mask (one block copy per drafted state; `vllm_dllm_spec.psd.runner`).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, fields

import torch
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl


@dataclass
class VerifyLayout:
    region_index: torch.Tensor  # [R, Q] flat token index of every region token
    prefix_slots: torch.Tensor  # [R, L] cache slot of every prefix position (padded with 0)
    prefix_valid: torch.Tensor  # [R, L] bool
    region_mask: torch.Tensor  # [R, Q, Q] bool: ref_token_mask per request

    def to(self, device) -> "VerifyLayout":
        """The layout on `device` (once per step, so no layer copies it)."""
        return VerifyLayout(*(getattr(self, f.name).to(device) for f in fields(self)))


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


def kv_layout(impl, layer) -> str:
    """The paged-cache layout an attention impl writes: 'vec' (CPU_ATTN's vec ISA) or 'flash'
    (FLASH_ATTN and TRITON_ATTN). Anything else (another CPU ISA, a quantized cache) raises."""
    if isinstance(impl, CPUAttentionBackendImpl):
        isa = getattr(layer, "isa", "vec")
        if isa != "vec":
            raise NotImplementedError(f"region attention reads the CPU KV cache in the 'vec' layout, got {isa!r}")
        return "vec"
    if getattr(impl, "kv_cache_dtype", "auto") != "auto":
        raise NotImplementedError(f"region attention reads an unquantized KV cache, got kv_cache_dtype "
                                  f"{impl.kv_cache_dtype!r}")
    return "flash"


def read_prefix_kv(layout: str, kv_cache: torch.Tensor, slots: torch.Tensor, num_kv_heads: int, head_size: int):
    """Keys and values [R, L, Hkv, D] of the paged-cache `slots` [R, L] in `layout`."""
    Hkv, D = num_kv_heads, head_size
    if layout == "vec":
        nb, _, bs, _ = kv_cache.shape
        # keys [nb, Hkv, D, bs] (transposed block interior), values [nb, Hkv, bs, D]
        k_cache = kv_cache.view(nb, Hkv, 2, bs * D)[:, :, 0].view(nb, Hkv, D, bs)
        v_cache = kv_cache.view(nb, Hkv, 2 * bs, D)[:, :, bs:]
        blk, off = slots // bs, slots % bs  # [R, L]
        return k_cache[blk, :, :, off], v_cache[blk, :, off, :]
    if layout == "flash":
        # [nb, Hkv, bs, 2D] -> keys, values [nb, bs, Hkv, D] (flash_attn.py / triton_attn.py)
        k_cache, v_cache = kv_cache.transpose(1, 2).split(D, dim=-1)
        bs = k_cache.shape[1]
        blk, off = slots // bs, slots % bs  # [R, L]
        return k_cache[blk, off], v_cache[blk, off]
    raise ValueError(f"KV layout must be 'vec' or 'flash', got {layout!r}")


class RegionAttentionMixin:
    """Mixed over an attention impl class by `region_impl_class`: its region rows follow the
    step's region mask (class swapped in on the target's attention layers by the SimSD / PSD
    runners). CPython refuses a `__class__` swap to a class whose first base is a mixin, so the
    generated class lists the impl first and takes this `forward` explicitly; `_base_impl` is the
    impl class whose forward runs first."""

    __slots__ = ()  # adds no instance layout, so `__class__` can be swapped on a built impl
    _base_impl: type

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):
        out = self._base_impl.forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                                      *args, **kwargs)
        lay = CURRENT
        if lay is None or attn_metadata is None or lay.region_index.numel() == 0:
            return out
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_size
        R, Q = lay.region_index.shape
        pk, pv = read_prefix_kv(kv_layout(self, layer), kv_cache, lay.prefix_slots, Hkv, D)  # [R, L, Hkv, D]
        idx = lay.region_index.reshape(-1)
        q = query.view(-1, H, D)[idx].view(R, Q, H, D).transpose(1, 2)  # [R, H, Q, D]
        rk = key.view(-1, Hkv, D)[idx].view(R, Q, Hkv, D)
        rv = value.view(-1, Hkv, D)[idx].view(R, Q, Hkv, D)
        keys = torch.cat([pk.to(rk.dtype), rk], dim=1).transpose(1, 2).repeat_interleave(H // Hkv, dim=1)
        vals = torch.cat([pv.to(rv.dtype), rv], dim=1).transpose(1, 2).repeat_interleave(H // Hkv, dim=1)
        L = pk.shape[1]
        mask = torch.cat([lay.prefix_valid[:, None, :].expand(R, Q, L), lay.region_mask], dim=2)
        scores = (q.float() @ keys.float().transpose(-1, -2)) * self.scale  # [R, H, Q, L + Q]
        scores = scores.masked_fill(~mask[:, None], float("-inf"))
        res = (scores.softmax(-1) @ vals.float()).to(output.dtype)  # [R, H, Q, D]
        out_view = output.view(-1, H, D)
        out_view[idx] = res.transpose(1, 2).reshape(R * Q, H, D)
        return out


@functools.lru_cache(maxsize=None)
def region_impl_class(base: type) -> type:
    """`base` (an attention impl class) with the region fix-up mixed in."""
    return type(f"Region{base.__name__}", (base, RegionAttentionMixin),
                {"__slots__": (), "__module__": __name__, "_base_impl": base, "forward": RegionAttentionMixin.forward})



def _supported_impls() -> tuple[type, ...]:
    impls: list[type] = [CPUAttentionBackendImpl]
    try:  # the GPU impls import on CPU too (vLLM's CPU build ships them); tolerate a build without
        from vllm.v1.attention.backends.flash_attn import FlashAttentionImpl
        from vllm.v1.attention.backends.triton_attn import TritonAttentionImpl

        impls += [FlashAttentionImpl, TritonAttentionImpl]
    except ImportError:
        pass
    return tuple(impls)


def install_region_attention(model) -> None:
    """Mixes the region fix-up into the impl of every attention layer of the target model."""
    from vllm.model_executor.layers.attention import Attention

    supported = _supported_impls()
    n = 0
    for module in model.modules():
        if not isinstance(module, Attention):
            continue
        impl_cls = type(module.impl)
        if issubclass(impl_cls, RegionAttentionMixin):
            n += 1
            continue
        if not issubclass(impl_cls, supported):
            raise RuntimeError(f"region attention runs over {', '.join(c.__name__ for c in supported)}, "
                               f"found {impl_cls.__name__} on {module.layer_name}")
        module.impl.__class__ = region_impl_class(impl_cls)
        n += 1
    if n == 0:
        raise RuntimeError("found no attention layer to install the verify-region attention on")
