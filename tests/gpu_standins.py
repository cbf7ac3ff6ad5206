"""CPU stand-ins that let vLLM's real GPU attention classes run on the CPU (tests only).

- TRITON_ATTN: vLLM's own Triton kernels under Triton's CPU interpreter (`TRITON_INTERPRET=1`).
  vLLM's CPU build disables Triton (`vllm.triton_utils` holds placeholders), so the real
  `triton` modules are put back before any kernel module is imported.
- FLASH_ATTN: the backend module's kernel globals are replaced: `flash_attn_varlen_func` by
  `flash_attn_varlen_func_ref` (a dense PyTorch twin of the paged-KV path, anchored to the
  interpreted Triton kernel by tests/test_vllm_gpu_wiring.py) and `reshape_and_cache_flash` by
  a scatter.
Both patch process-wide state, so they run only in subprocesses (tests/gpu_wiring_run.py).
"""
from __future__ import annotations

import os

import torch


def use_triton_interpreter() -> None:
    """Must run before anything imports a vLLM Triton kernel module."""
    os.environ["TRITON_INTERPRET"] = "1"
    import triton
    import triton.language as tl
    import triton.language.extra.libdevice as tldevice
    import vllm.triton_utils as vtu

    vtu.triton, vtu.tl, vtu.tldevice = triton, tl, tldevice
    # triton_reshape_and_cache_flash asks for the compute capability (no CUDA here)
    torch.cuda.get_device_capability = lambda *a, **k: (9, 0)


def flash_attn_varlen_func_ref(q, k, v, max_seqlen_q, cu_seqlens_q, max_seqlen_k, cu_seqlens_k=None,
                               seqused_k=None, softmax_scale=None, causal=False, window_size=None,
                               softcap=0.0, alibi_slopes=None, block_table=None, out=None,
                               dynamic_causal=None, mask_mod=None, s_aux=None, q_v=None,
                               return_softmax_lse=False, aux_tensors=None, **_unused):
    """`vllm_flash_attn.flash_attn_varlen_func` on a paged KV cache, one request at a time:
    q [T, H, D], k / v [num_blocks, block_size, Hkv, D]; causal is bottom-right aligned (query i
    of a request with L keys sits at key position L - qlen + i). Raises on what it does not
    model, so a test cannot pass through an argument it ignores."""
    if cu_seqlens_k is not None or block_table is None or seqused_k is None:
        raise NotImplementedError("the stand-in models the paged KV path only (block_table + seqused_k)")
    if any(x is not None for x in (mask_mod, aux_tensors, s_aux, alibi_slopes, q_v, dynamic_causal)) \
            or return_softmax_lse:
        raise NotImplementedError("mask_mod / sinks / alibi / q_v / dynamic_causal / lse are not modelled")
    if window_size is not None and tuple(window_size) != (-1, -1):
        raise NotImplementedError(f"sliding windows are not modelled, got {window_size}")
    T, H, D = q.shape
    bs, Hkv = k.shape[1], k.shape[2]
    scale = D**-0.5 if softmax_scale is None else softmax_scale
    out = torch.empty_like(q) if out is None else out
    cu, used = cu_seqlens_q.tolist(), seqused_k.tolist()
    for r in range(len(cu) - 1):  # a test stand-in: clarity over speed
        q0, q1, L = cu[r], cu[r + 1], used[r]
        if q1 == q0:
            continue
        kpos = torch.arange(L)
        blocks = block_table[r, kpos // bs].long()
        keys = k[blocks, kpos % bs].repeat_interleave(H // Hkv, 1).float()  # [L, H, D]
        vals = v[blocks, kpos % bs].repeat_interleave(H // Hkv, 1).float()
        s = torch.einsum("qhd,khd->hqk", q[q0:q1].float(), keys) * scale  # [H, n, L]
        if softcap:
            s = softcap * torch.tanh(s / softcap)
        if causal:
            qpos = torch.arange(q1 - q0) + (L - (q1 - q0))
            s = s.masked_fill(~(kpos[None] <= qpos[:, None])[None], float("-inf"))
        p = torch.nan_to_num(s.softmax(-1))  # a fully masked row gives 0, as FA
        out[q0:q1] = torch.einsum("hqk,khd->qhd", p, vals).to(out.dtype)
    return out


def reshape_and_cache_flash_ref(key, value, key_cache, value_cache, slot_mapping, *_args):
    """vLLM's `reshape_and_cache_flash`: key / value [T, Hkv, D] into caches
    [num_blocks, block_size, Hkv, D] at `slot_mapping` (negative slots are padding)."""
    slots = slot_mapping.long()
    n = slots.shape[0]
    ok = slots >= 0
    bs = key_cache.shape[1]
    key_cache[slots[ok] // bs, slots[ok] % bs] = key[:n][ok]
    value_cache[slots[ok] // bs, slots[ok] % bs] = value[:n][ok]


def use_flash_standin() -> None:
    """Points vLLM's FLASH_ATTN backend module at the stand-in kernels (FA3 semantics)."""
    import vllm.v1.attention.backends.flash_attn as fa

    fa.flash_attn_varlen_func = flash_attn_varlen_func_ref
    fa.reshape_and_cache_flash = reshape_and_cache_flash_ref
    fa.get_flash_attn_version = lambda *a, **k: 3
    fa.get_scheduler_metadata = lambda *a, **k: None
    torch.cuda.get_device_capability = lambda *a, **k: (9, 0)


def dense_block_causal(q, keys, values, query_pos, block_length: int, scale: float):
    """Obviously-correct block-causal attention of one request: q [n, H, D] at `query_pos` [n],
    keys / values [L, Hkv, D] at positions 0..L-1."""
    H, Hkv = q.shape[1], keys.shape[1]
    kpos = torch.arange(keys.shape[0])
    s = torch.einsum("qhd,khd->hqk", q.float(), keys.repeat_interleave(H // Hkv, 1).float()) * scale
    visible = (kpos[None] // block_length) <= (query_pos[:, None] // block_length)  # [n, L]
    s = s.masked_fill(~visible[None], float("-inf"))
    return torch.einsum("hqk,khd->qhd", s.softmax(-1), values.repeat_interleave(H // Hkv, 1).float())
