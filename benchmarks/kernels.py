"""Benchmark of the dllm_spec C++/CUDA operators against their PyTorch `*_ref` twins.

Each op runs at serving sizes (batch 1..256, SDAR block 4..16) on one device; every case checks
that the compiled op equals its twin, times both (median over repeats) and reports the ratio
ref_time / op_time (> 1: the compiled op is faster). On a GPU the absolute times are printed too.

    .venv/bin/python benchmarks/kernels.py                 # full preset on CPU
    .venv/bin/python benchmarks/kernels.py --preset smoke  # a few seconds
    .venv/bin/python benchmarks/kernels.py --device cuda

Prints one summary line (ratios at batch 64; region_attention at each of its batches, 1/8/32/256
in the full preset) and writes JSON (default benchmarks/results/kernels.json).
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from vllm_dllm_spec import ops

MASK_ID = 151669
PRESETS = {
    "smoke": dict(batches=[1, 64], blocks=[4], vocab=512, min_time=0.005, repeats=3,
                  region_batches=[1, 8], region_blocks=[4]),
    "full": dict(batches=[1, 8, 64, 256], blocks=[4, 8, 16], vocab=8192, min_time=0.05, repeats=5,
                 region_batches=[1, 8, 32, 256], region_blocks=[4, 8]),
}
# region_attention at a 1.7B-class serving size (Qwen3-1.7B / SDAR-1.7B heads), bf16 like the
# bundled models; the prefix is a prompt plus some generated blocks
REGION = dict(num_heads=16, num_kv_heads=8, head_dim=128, prefix=(64, 192), cache_block_size=16,
              num_draft_blocks=2, dtype=torch.bfloat16)
FLOAT_TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device: torch.device, min_time: float, repeats: int) -> float:
    """Median seconds per call; each repeat loops until `min_time` has passed."""
    fn()
    _sync(device)
    n = 1
    while True:  # calibrate the inner loop count
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        _sync(device)
        dt = time.perf_counter() - t0
        if dt >= min_time or n >= 1 << 16:
            break
        n *= 2 if dt <= 0 else max(2, min(16, math.ceil(min_time / dt)))
    samples = [dt / n]
    for _ in range(repeats - 1):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        _sync(device)
        samples.append((time.perf_counter() - t0) / n)
    return statistics.median(samples)


# ----------------------------------------------------------------------------------------------
# inputs at serving sizes
# ----------------------------------------------------------------------------------------------
def mask_inputs(batch: int, block: int, g: torch.Generator, device, num_blocks: int = 2):
    """SimSD verify layouts: num_blocks draft blocks of `block` data tokens + `block` copies."""
    labels = [[torch.randint(0, block + 2, (block,), generator=g).tolist() for _ in range(num_blocks)]
              for _ in range(batch)]
    qsl, kind, step, blk = ops.simsd_layout(labels, device=device)
    return qsl, kind, step, blk, 2 * block * num_blocks


def greedy_inputs(batch: int, block: int, g: torch.Generator, device, num_blocks: int = 2):
    k = block * num_blocks  # SimSD: K draft blocks verified at once
    target = torch.randint(0, 4, (batch, k + 1), generator=g)
    draft = torch.where(torch.rand((batch, k), generator=g) < 0.9, target[:, :k], 0)
    nd = torch.randint(0, k + 1, (batch,), generator=g)
    return tuple(t.to(device) for t in (draft, nd, target, nd + 1))


def rejection_inputs(batch: int, block: int, vocab: int, g: torch.Generator, device):
    k = block
    pd = torch.randn((batch, k, vocab), generator=g).softmax(-1)
    pt = (torch.randn((batch, k + 1, vocab), generator=g) * 0.5).softmax(-1)
    draft = torch.multinomial(pd.reshape(-1, vocab), 1, generator=g).reshape(batch, k)
    nd = torch.full((batch,), k, dtype=torch.int64)
    ua, ur = torch.rand((batch, k), generator=g), torch.rand((batch,), generator=g)
    return tuple(t.to(device) for t in (draft, nd, pd, pt, nd + 1, ua, ur))


def hier_inputs(batch: int, block: int, g: torch.Generator, device):
    """PSD chains: depth d unmasks one more position (in random order) than depth d - 1."""
    n = block
    verify = torch.randint(0, 1000, (batch, block), generator=g)
    base = torch.full((batch, block), MASK_ID, dtype=torch.int64)
    order = torch.rand((batch, block), generator=g).argsort(dim=1)  # unmasking order
    rank = order.argsort(dim=1)  # [batch, block]: depth - 1 at which each position unmasks
    depth = torch.arange(1, n + 1)[None, :, None]  # [1, n, 1]
    tokens = torch.where(torch.rand((batch, 1, block), generator=g) < 0.97, verify[:, None], 7)
    nodes = torch.where(rank[:, None, :] < depth, tokens, MASK_ID)  # [batch, n, block]
    parent = ops.chain_parents(batch, n)
    nn = torch.full((batch,), n, dtype=torch.int64)
    return tuple(t.to(device) for t in (base, nodes, parent, nn, verify)) + (MASK_ID,)


def region_inputs(batch: int, block: int, g: torch.Generator, device):
    """A SimSD verify step: per request 2 draft blocks of data tokens + mask copies (Q = 4 * block
    region rows) among the step's other tokens, a paged CPU-layout ('vec') cache, shuffled block
    tables, ragged prefixes."""
    from vllm_dllm_spec.region import paged_kv

    H, Hkv, D, cbs, K = (REGION[k] for k in ("num_heads", "num_kv_heads", "head_dim", "cache_block_size",
                                              "num_draft_blocks"))
    labels = torch.randint(0, block + 2, (batch, K, 1, block), generator=g).expand(-1, -1, 2, -1)
    kind = torch.tensor([ops.KIND_DATA, ops.KIND_MASK])[None, None, :, None].expand_as(labels)
    blk = torch.arange(K)[None, :, None, None].expand_as(labels)
    kind, step, blk = (t.reshape(batch, -1).contiguous() for t in (kind, labels, blk))
    Q = kind.shape[1]
    prefix = torch.randint(*REGION["prefix"], (batch,), generator=g)
    max_blocks = -(-int(prefix.max()) // cbs) + 1
    nb = batch * max_blocks
    table = torch.randperm(nb, generator=g).view(batch, max_blocks)
    T = batch * Q
    region_index = torch.arange(T).view(batch, Q)
    qkv = torch.randn((T, (H + 2 * Hkv) * D), generator=g).to(REGION["dtype"])
    q, k, v = (t.reshape(T, -1, D) for t in qkv.split([H * D, Hkv * D, Hkv * D], dim=1))
    kv_cache = torch.randn((nb, 2 * Hkv, cbs, D), generator=g).to(REGION["dtype"])
    k_cache, v_cache = paged_kv("vec", kv_cache, Hkv, D)
    args = (q, k, v, region_index, kind, step, blk, k_cache, v_cache, table, prefix)
    return tuple(a.to(device) for a in args) + (D ** -0.5,)


def cases(preset: dict, device, g: torch.Generator):
    for batch in preset["region_batches"]:
        for block in preset["region_blocks"]:
            yield "region_attention", batch, block, region_inputs(batch, block, g, device)
    for batch in preset["batches"]:
        for block in preset["blocks"]:
            yield "ref_token_mask", batch, block, mask_inputs(batch, block, g, device)
            yield "greedy_match", batch, block, greedy_inputs(batch, block, g, device)
            yield ("rejection_sample", batch, block,
                   rejection_inputs(batch, block, preset["vocab"], g, device))
            yield "hierarchical_accept", batch, block, hier_inputs(batch, block, g, device)


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        if a.is_floating_point():  # region_attention: fp32 accumulation in another order
            return a.dtype == b.dtype and torch.allclose(a.float(), b.float(), **FLOAT_TOL[b.dtype])
        return torch.equal(a, b)
    return all(torch.equal(x, y) for x, y in zip(a, b))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="full")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--vocab", type=int, help="vocab size of rejection_sample (preset default)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "kernels.json"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's own; "
                    "1 gives stabler ratios on a busy shared machine)")
    args = ap.parse_args(argv)
    preset = dict(PRESETS[args.preset])
    if args.vocab:
        preset["vocab"] = args.vocab
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not ops.HAS_C:
        print(f"kernels: vllm_dllm_spec._C not built ({ops.C_LOAD_ERROR}); nothing to compare",
              file=sys.stderr)
        return 1
    g = torch.Generator().manual_seed(args.seed)
    todo = list(cases(preset, device, g))
    rows = []
    for name, batch, block, inp in tqdm(todo, desc="kernels", disable=None):
        op = getattr(torch.ops.dllm_spec, name)
        ref = getattr(ops, f"{name}_ref")
        if not ops.has_kernel(name, device):
            raise SystemExit(f"no compiled {name} for {device}")
        ok = _equal(op(*inp), ref(*inp))
        t_op = _time(lambda: op(*inp), device, preset["min_time"], preset["repeats"])
        t_ref = _time(lambda: ref(*inp), device, preset["min_time"], preset["repeats"])
        rows.append(dict(op=name, batch=batch, block=block, equal=ok, op_us=t_op * 1e6,
                         ref_us=t_ref * 1e6, speedup=t_ref / t_op))
        if device.type == "cuda":
            tqdm.write(f"{name:20s} batch {batch:4d} block {block:2d}: op {t_op * 1e6:9.1f} us  "
                       f"ref {t_ref * 1e6:9.1f} us  x{t_ref / t_op:6.1f}")

    at64 = {}
    for name in ("ref_token_mask", "greedy_match", "rejection_sample", "hierarchical_accept"):
        sp = [r["speedup"] for r in rows if r["op"] == name and r["batch"] == 64]
        if sp:
            at64[name] = math.exp(statistics.fmean(math.log(s) for s in sp))  # geomean over blocks
    region = {}
    for batch in preset["region_batches"]:
        sp = [r["speedup"] for r in rows if r["op"] == "region_attention" and r["batch"] == batch]
        region[batch] = math.exp(statistics.fmean(math.log(s) for s in sp))  # geomean over blocks
    all_equal = all(r["equal"] for r in rows)
    result = dict(
        benchmark="kernels", preset=args.preset, device=str(device),
        device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        torch=torch.__version__, threads=torch.get_num_threads(), vocab=preset["vocab"],
        all_equal=all_equal, speedup_at_batch64=at64,
        region_attention=dict(REGION, dtype=str(REGION["dtype"]), blocks=preset["region_blocks"],
                              speedup_by_batch=region),
        rows=rows,
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    summary = " ".join(f"{k}={v:.1f}x" for k, v in at64.items())
    region_summary = " ".join(f"b{b}={v:.1f}x" for b, v in region.items())
    print(f"SUMMARY kernels[{args.preset}, {device}]: ref/op speedup at batch 64 (geomean over blocks "
          f"{preset['blocks']}): {summary}; region_attention by batch (blocks {preset['region_blocks']}): "
          f"{region_summary}; all outputs equal={all_equal}; json={out}")
    return 0 if all_equal else 2


if __name__ == "__main__":
    sys.exit(main())
