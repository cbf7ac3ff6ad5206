"""dllm_spec::region_attention (csrc) against its PyTorch twin `ops.region_attention_ref`, the twin
against a per-row float64 oracle written from docs/CONTRACTS.md, at awkward sizes (GQA, head_dim
32/64/128, block 4/8/16, empty and ragged prefixes, both KV layouts through `region.paged_kv`,
SimSD reference-token and PSD block-copy triples), opcheck, input validation, CUDA when present."""
from __future__ import annotations

import math

import pytest
import torch

from tolerances import assert_close
from vllm_dllm_spec import ops
from vllm_dllm_spec.region import paged_kv

needs_c = pytest.mark.skipif(not ops.HAS_C, reason=f"vllm_dllm_spec._C not built: {ops.C_LOAD_ERROR}")
_CUDA_OK = torch.cuda.is_available() and ops.has_kernel("region_attention", "cuda")
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
        not _CUDA_OK, reason="no GPU, or _C built without CUDA kernels")]),
]


def _simsd_triples(R: int, num_blocks: int, block: int, g: torch.Generator):
    """[R, 2 * num_blocks * block] (kind, step, block_idx): per draft block `block` data tokens,
    then their mask copies with the same labels (labels 0..block + 1, as SimSD draws them)."""
    labels = torch.randint(0, block + 2, (R, num_blocks, 1, block), generator=g).expand(-1, -1, 2, -1)
    kind = torch.tensor([ops.KIND_DATA, ops.KIND_MASK])[None, None, :, None].expand_as(labels)
    blk = torch.arange(num_blocks)[None, :, None, None].expand_as(labels)
    return tuple(t.reshape(R, -1).contiguous() for t in (kind, labels, blk))


def make_case(R=3, H=4, Hkv=2, D=64, block=4, mask="simsd", layout="vec", dtype=torch.float32,
              cache_bs=16, prefix=None, seed=0, num_draft_blocks=2, device="cpu"):
    """Random inputs of the op: a flat token batch with the region rows scattered in it (plus
    other tokens), query/key/value as non-contiguous slices of one qkv tensor (as vLLM's split
    gives them), a paged cache in `layout` viewed through `region.paged_kv`, shuffled block
    tables and ragged prefix lengths (`prefix`: list, default random incl. 0)."""
    g = torch.Generator().manual_seed(seed)
    if mask == "simsd":
        kind, step, blk = _simsd_triples(R, num_draft_blocks, block, g)
    else:
        kind, step, blk = ops.block_copies_triples(R, num_draft_blocks + 1, block)
    Q = kind.shape[1]
    if prefix is None:
        prefix = torch.randint(0, 5 * cache_bs, (R,), generator=g)
        prefix[0] = 0  # an empty prefix
    prefix_len = torch.as_tensor(prefix, dtype=torch.int64)
    max_blocks = max(1, math.ceil(int(prefix_len.max()) / cache_bs) + 1)
    nb = R * max_blocks + 3
    block_table = torch.randperm(nb, generator=g)[: R * max_blocks].view(R, max_blocks).contiguous()
    T = R * Q + 7  # other tokens of the step around the regions
    region_index = torch.randperm(T, generator=g)[: R * Q].view(R, Q).contiguous()
    qkv = torch.randn((T, (H + 2 * Hkv) * D), generator=g).to(dtype)
    q, k, v = qkv.split([H * D, Hkv * D, Hkv * D], dim=1)
    if layout == "vec":
        kv_cache = torch.randn((nb, 2 * Hkv, cache_bs, D), generator=g).to(dtype)
    else:  # physically [nb, bs, Hkv, 2D], seen as [nb, Hkv, bs, 2D] (vLLM's FA / Triton cache)
        kv_cache = torch.randn((nb, cache_bs, Hkv, 2 * D), generator=g).to(dtype).transpose(1, 2)
    k_cache, v_cache = paged_kv(layout, kv_cache, Hkv, D)
    args = (q.view(T, H, D), k.view(T, Hkv, D), v.view(T, Hkv, D), region_index, kind, step, blk,
            k_cache, v_cache, block_table, prefix_len, 1.0 / math.sqrt(D))
    return tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)


def oracle(query, key, value, region_index, kind, step, block_idx, k_cache, v_cache, block_table,
           prefix_len, scale):
    """One row at a time in float64, from the contract: visible keys = cached positions
    p < prefix_len[r] (slot block_table[r, p // bs], p % bs) and the region tokens j with
    ref_visible(row, j); head h reads kv head h // (H / Hkv)."""
    R, Q = region_index.shape
    H, D = query.shape[1:]
    G, bs = H // key.shape[1], k_cache.shape[1]
    out = torch.zeros((R, Q, H, D), dtype=torch.float64)
    for r in range(R):
        L = int(prefix_len[r])
        pos = torch.arange(L)
        blk = block_table[r, pos // bs]
        pk, pv = k_cache[blk, pos % bs].double(), v_cache[blk, pos % bs].double()  # [L, Hkv, D]
        for i in range(Q):
            vis = [j for j in range(Q) if _visible(kind[r, i], step[r, i], block_idx[r, i],
                                                     kind[r, j], step[r, j], block_idx[r, j])]
            toks = region_index[r, vis]
            keys = torch.cat([pk, key[toks].double()])  # [n, Hkv, D]
            vals = torch.cat([pv, value[toks].double()])
            for h in range(H):
                s = keys[:, h // G] @ query[region_index[r, i], h].double() * scale  # [n]
                out[r, i, h] = s.softmax(0) @ vals[:, h // G]
    return out


def _visible(kq, sq, bq, kk, sk, bk) -> bool:
    """docs/CONTRACTS.md section 1, the reference-token rule."""
    if bk != bq:
        return bool(bk < bq and kk == ops.KIND_DATA)
    if kq == ops.KIND_DATA:
        return bool(sk <= sq) if kk == ops.KIND_DATA else bool(sk > sq)
    return bool(sk < sq) if kk == ops.KIND_DATA else bool(sk >= sq)


@pytest.mark.parametrize("mask", ["simsd", "copies"])
@pytest.mark.parametrize("layout", ["vec", "flash"])
def test_ref_equals_oracle(mask, layout):
    args = make_case(R=3, H=4, Hkv=2, D=32, block=4, mask=mask, layout=layout, cache_bs=4, seed=7)
    torch.testing.assert_close(ops.region_attention_ref(*args).double(), oracle(*args), atol=1e-5, rtol=1e-5)


def test_block_copies_are_block_diagonal():
    """PSD's triples give exactly the block-diagonal mask under ref_visible."""
    kind, step, blk = ops.block_copies_triples(2, 3, 4)
    mask = ops.ref_token_mask_ref(torch.tensor([0, 12, 24]), kind.flatten(), step.flatten(), blk.flatten(), 12)
    copy_of = torch.arange(12) // 4
    assert torch.equal(mask.view(2, 12, 12), (copy_of[:, None] == copy_of[None, :]).expand(2, 12, 12))


CASES = [  # (R, H, Hkv, D, block, cache_bs)
    (1, 4, 4, 32, 4, 16),
    (5, 8, 2, 64, 8, 16),  # GQA 4
    (3, 6, 3, 128, 16, 32),
    (9, 4, 1, 64, 4, 4),  # MQA, cache blocks as small as the SDAR block
    (2, 2, 2, 40, 4, 8),  # head_dim not a multiple of 16
]


@needs_c
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "R{}_H{}_Hkv{}_D{}_B{}_bs{}".format(*c))
@pytest.mark.parametrize("mask", ["simsd", "copies"])
@pytest.mark.parametrize("layout", ["vec", "flash"])
def test_op_equals_ref(device, case, mask, layout):
    R, H, Hkv, D, block, cbs = case
    args = make_case(R=R, H=H, Hkv=Hkv, D=D, block=block, mask=mask, layout=layout, cache_bs=cbs,
                     seed=R * D + block, device=device)
    assert ops.has_kernel("region_attention", device)
    out = torch.ops.dllm_spec.region_attention(*args)
    assert out.shape == (R, args[3].shape[1], H, D)
    assert_close(out.cpu(), ops.region_attention_ref(*args).cpu())


@needs_c
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_op_equals_ref_low_precision(device, dtype):
    args = make_case(R=4, H=8, Hkv=2, D=64, block=8, dtype=dtype, layout="flash", seed=3, device=device)
    out = torch.ops.dllm_spec.region_attention(*args)
    assert out.dtype == dtype
    assert_close(out.cpu(), ops.region_attention_ref(*args).cpu())


@needs_c
def test_all_prefixes_empty_and_empty_batch():
    args = make_case(R=3, prefix=[0, 0, 0], seed=1)
    assert_close(torch.ops.dllm_spec.region_attention(*args), ops.region_attention_ref(*args))
    args = make_case(R=2, seed=2)
    empty = (*args[:3], *(t[:0] for t in args[3:7]), *args[7:9], args[9][:0], args[10][:0], args[11])
    out = torch.ops.dllm_spec.region_attention(*empty)
    assert out.shape == (0, args[3].shape[1], 4, 64)


@needs_c
def test_the_mask_matters():
    """Control: the op's output changes when one token's label does (the mask is really used)."""
    args = list(make_case(R=1, block=4, prefix=[5], seed=4))
    out = torch.ops.dllm_spec.region_attention(*args)
    args[5] = args[5].clone()
    args[5][0, 1] += 3
    assert not torch.allclose(out, torch.ops.dllm_spec.region_attention(*args))


@needs_c
@pytest.mark.parametrize("layout", ["vec", "flash"])
def test_opcheck(layout):
    args = make_case(R=2, H=4, Hkv=2, D=32, block=4, layout=layout, seed=5)
    torch.library.opcheck(torch.ops.dllm_spec.region_attention.default, args)


@needs_c
def test_invalid_inputs_raise():
    args = list(make_case(R=2, seed=6))
    ra = torch.ops.dllm_spec.region_attention

    def call(i, value, match):
        bad = list(args)
        bad[i] = value
        with pytest.raises(RuntimeError, match=match):
            ra(*bad)

    call(0, args[0].new_zeros((args[0].shape[0], 5, 64)), "num_kv_heads")  # H = 5, Hkv = 2
    call(3, args[3] + 1000, r"region_index\[0, 0\] = \d+ outside")
    call(4, args[4].int(), "kind must be int64")
    call(10, torch.tensor([0, 10_000]), r"prefix_len\[1\] = 10000 outside")
    call(9, torch.full_like(args[9], 999), r"block_table\[\d, 0\] = 999 outside")
    call(7, args[7].double(), "must have the query's dtype")


def test_front_falls_back_to_ref(monkeypatch):
    monkeypatch.setattr(ops, "BACKEND", "ref")
    args = make_case(R=2, seed=8)
    assert torch.equal(ops.region_attention(*args), ops.region_attention_ref(*args))
