"""Region attention shared by SimSD, PSD (and Spiffy): verify rows with their own mask, on vLLM's
paged KV cache (CPU_ATTN, FLASH_ATTN and TRITON_ATTN).

A SimSD verify step feeds each request `[uncommitted full blocks | data_0 | copies_0 | ...]`.
The uncommitted blocks (and every non-SimSD token) go through the project's block-causal path
(`vllm_dllm_spec.attention`, the platform's kernel). The verify REGION (`data_k | copies_k`, 2KB
tokens per request, starting at the in-progress block) needs the reference-token mask, which
the kernels cannot express; `RegionAttentionMixin.forward` (mixed over the layer's own impl
class by `install_region_attention`) therefore recomputes the region rows with one op,
`ops.region_attention` (csrc: C++ on CPU, CUDA on GPU), batched over requests:

    keys = [cached prefix (positions < block_start, read from the paged cache through the block
            table, the uncommitted blocks of this step included: vLLM writes KV before
            attention) | region keys]
    visible = prefix always; region key j iff ref_visible(row's triple, j's triple)

evaluated per (query, key) inside the kernel (no [Q, Q] or [Q, L + Q] mask exists), and
overwrites the kernel's output rows of the region (the block-causal builder gives those rows
only themselves as keys, so the kernel barely spends work on them: `VerifyLayout.region_start`).
The region's own KV is written to the cache by vLLM at its (sequential) slots; those slots lie
after the committed prefix and are re-fed next round, never hashed for prefix caching (they are
spec tokens).

The op reads the paged cache through strided views, `paged_kv`, of the CPU 'vec' layout and the
FA/Triton layout. The step's layouts are published by the runner in `CURRENT` (module state of
this process, on the runner's device, set before the model forward and cleared after it): one
layout per region length, since a layout is rectangular ([R, Q]) and PSD's / Spiffy's requests
feed only the block copies that carry a state (1 .. C copies each), one op call per length.
PSD's (and Spiffy's) verify step uses the same op with block copies (one per drafted state,
each seeing only itself and the prefix), expressed in the same triples
(`ops.block_copies_triples`); their copy 0 is a plain block, left to the normal kernel, so only
copies 1.. form the region.
"""
from __future__ import annotations

import copy
import functools
from collections.abc import Sequence
from dataclasses import dataclass, field, fields

import numpy as np
import torch
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl

from vllm_dllm_spec import ops


@dataclass
class VerifyLayout:
    """What a verify step gives the region attention: per region row a (kind, step, block)
    triple (the compact mask form of `ops.ref_visible`, docs/CONTRACTS.md) and per request the
    block table and the cached prefix length; no mask tensor."""
    region_index: torch.Tensor  # [R, Q] flat token index of every region token
    kind: torch.Tensor  # [R, Q] ops.KIND_DATA / ops.KIND_MASK
    step: torch.Tensor  # [R, Q] label
    block_idx: torch.Tensor  # [R, Q] draft block (PSD / Spiffy: block copy)
    block_table: torch.Tensor  # [R, max_blocks] int64 paged-cache blocks of each request
    prefix_len: torch.Tensor  # [R] cached positions < prefix_len (the in-progress block's start)
    # [R] host: region_index[:, 0], for the block-causal builder (attention.py), which gives the
    # region rows no prefix in the normal kernel (they are overwritten); stays on the host
    region_start: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        ri = self.region_index  # [R, Q] on the host (a layout is built there, then moved)
        self.region_start = ri[:, 0].numpy() if ri.shape[1] else np.zeros(0, np.int64)
        if not torch.equal(ri, ri[:, :1] + torch.arange(ri.shape[1])):
            raise ValueError("a verify region is a run of consecutive tokens of its request's query")

    def to(self, device) -> "VerifyLayout":
        """The layout on `device` (once per step, so no layer copies it); region_start stays on the host."""
        moved = copy.copy(self)
        for f in fields(self):
            if f.init:
                setattr(moved, f.name, getattr(self, f.name).to(device))
        return moved


# the step's verify layouts, one per region length (empty outside a verify step)
CURRENT: tuple[VerifyLayout, ...] = ()


def query_region_starts(layouts: Sequence[VerifyLayout], query_start_loc: np.ndarray) -> np.ndarray:
    """[num_reqs] flat index of each request's first region token, its query end where it has
    none, from the step's layouts and query_start_loc [num_reqs + 1] (host). Raises unless every
    region is a whole suffix of its own request's query (what the op overwrites is what the
    split spares)."""
    qsl = query_start_loc.astype(np.int64)
    starts = np.concatenate([lay.region_start for lay in layouts])  # [R]
    lengths = np.concatenate([np.full(len(lay.region_start), lay.region_index.shape[1]) for lay in layouts])  # [R]
    req = np.searchsorted(qsl[1:], starts, side="right")  # [R] the request holding each region start
    ok = (req < len(qsl) - 1).all() and len(np.unique(req)) == len(req)
    if not ok or (qsl[np.minimum(req, len(qsl) - 2) + 1] - starts != lengths).any():
        raise RuntimeError(f"verify regions (starts {starts.tolist()}, lengths {lengths.tolist()}) are not "
                           f"suffixes of distinct requests' queries (query_start_loc {qsl.tolist()})")
    out = qsl[1:].copy()
    out[req] = starts
    return out


def cache_slots(block_tables: torch.Tensor, positions: torch.Tensor, cache_block_size: int) -> torch.Tensor:
    """block_tables [R, max_blocks], positions [R, P] -> paged-cache slots [R, P]."""
    return block_tables.gather(1, positions // cache_block_size) * cache_block_size + positions % cache_block_size


def simsd_layout(region_index: torch.Tensor, kind: torch.Tensor, step: torch.Tensor, block_idx: torch.Tensor,
                 block_tables: torch.Tensor, block_starts: torch.Tensor) -> VerifyLayout:
    """SimSD's verify layout: the reference-token triples [R, Q] of `data_k | copies_k` per request."""
    return VerifyLayout(region_index, kind, step, block_idx, block_tables.long(), block_starts.long())


def block_copies_layout(region_index: torch.Tensor, block_tables: torch.Tensor, block_starts: torch.Tensor,
                        num_copies: int, block_length: int) -> VerifyLayout:
    """PSD's / Spiffy's verify layout: `num_copies` copies of the block, each seeing only itself and
    the prefix (block-diagonal; `ops.block_copies_triples`)."""
    triples = ops.block_copies_triples(len(region_index), num_copies, block_length)
    return VerifyLayout(region_index, *triples, block_tables.long(), block_starts.long())


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


def paged_kv(layout: str, kv_cache: torch.Tensor, num_kv_heads: int, head_size: int):
    """Views (no copy) keys, values [num_blocks, block_size, Hkv, D] of the paged cache in `layout`."""
    Hkv, D = num_kv_heads, head_size
    if layout == "vec":
        nb, _, bs, _ = kv_cache.shape
        # keys [nb, Hkv, D, bs] (transposed block interior), values [nb, Hkv, bs, D]
        k_cache = kv_cache.view(nb, Hkv, 2, bs * D)[:, :, 0].view(nb, Hkv, D, bs)
        v_cache = kv_cache.view(nb, Hkv, 2 * bs, D)[:, :, bs:]
        return k_cache.permute(0, 3, 1, 2), v_cache.permute(0, 2, 1, 3)
    if layout == "flash":
        # [nb, Hkv, bs, 2D] -> keys, values [nb, bs, Hkv, D] (flash_attn.py / triton_attn.py)
        k_cache, v_cache = kv_cache.transpose(1, 2).split(D, dim=-1)
        return k_cache, v_cache
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
        if not CURRENT or attn_metadata is None:
            return out
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_size
        k_cache, v_cache = paged_kv(kv_layout(self, layer), kv_cache, Hkv, D)  # [nb, bs, Hkv, D] views
        q, k, v = query.view(-1, H, D), key.view(-1, Hkv, D), value.view(-1, Hkv, D)
        for lay in CURRENT:
            R, Q = lay.region_index.shape
            if R * Q == 0:
                continue
            res = ops.region_attention(q, k, v, lay.region_index, lay.kind, lay.step, lay.block_idx, k_cache,
                                       v_cache, lay.block_table, lay.prefix_len, self.scale)  # [R, Q, H, D]
            output.view(-1, H, D)[lay.region_index.reshape(-1)] = res.view(R * Q, H, D).to(output.dtype)
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
