"""dllm_spec operators (csrc/) against their PyTorch `*_ref` twins (vllm_dllm_spec/ops.py), the
`*_ref` twins against independent per-token oracles written from docs/CONTRACTS.md, opcheck on
CPU, the same comparisons on CUDA when a GPU exists, and an nvcc compile check of csrc/cuda."""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch

from vllm_dllm_spec import ops

ROOT = Path(__file__).resolve().parents[1]
MASK_ID = 151669
# The one tolerance table (every op output is integer/bool and compared with torch.equal; only
# the statistical sanity check of rejection sampling needs a float tolerance).
TOL = {"sampling_total_variation": 0.02}

_CUDA_OK = torch.cuda.is_available() and ops.has_kernel("greedy_match", "cuda")
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
        not _CUDA_OK, reason="no GPU, or _C built without CUDA kernels")]),
]
needs_c = pytest.mark.skipif(not ops.HAS_C, reason=f"vllm_dllm_spec._C not built: {ops.C_LOAD_ERROR}")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _compiled(name: str, device: str):
    assert ops.has_kernel(name, device), f"no compiled {name} for {device}"
    return getattr(torch.ops.dllm_spec, name)


def test_extension_loads():
    if os.environ.get("DLLM_SPEC_NO_EXT") == "1":
        pytest.skip("built with DLLM_SPEC_NO_EXT=1")
    assert ops.HAS_C, ops.C_LOAD_ERROR
    assert ops.BACKEND == ("ref" if ops.FORCE_REF else "csrc")
    for name in ("ref_token_mask", "greedy_match", "rejection_sample", "hierarchical_accept", "graph_accept"):
        assert ops.has_kernel(name, "cpu"), name


# ----------------------------------------------------------------------------------------------
# 1. reference-token mask
# ----------------------------------------------------------------------------------------------
def _random_layout(num_reqs: int, block: int, seed: int, max_blocks: int = 3):
    g = _gen(seed)
    labels = []
    for r in range(num_reqs):
        if num_reqs > 1 and r % 11 == 5:
            labels.append([])  # a request with an empty query region
            continue
        nblk = int(torch.randint(1, max_blocks + 1, (1,), generator=g))
        blocks = []
        for _ in range(nblk):
            n = block if torch.rand((), generator=g) < 0.5 else int(torch.randint(1, block + 1, (1,), generator=g))
            blocks.append(torch.randint(0, block + 2, (n,), generator=g).tolist())  # 0..B+1
        labels.append(blocks)
    return labels


def _mask_oracle(labels, max_q: int) -> torch.Tensor:
    """Per-token loops, written directly from the rules in CONTRACTS.md."""
    rows = []
    for blocks in labels:
        toks = []  # (kind, label, block)
        for b, lab in enumerate(blocks):
            toks += [(0, t, b) for t in lab] + [(1, t, b) for t in lab]
        for kq, tq, bq in toks:
            row = [False] * max_q
            for j, (kk, tk, bk) in enumerate(toks[:max_q]):
                if bk < bq:
                    row[j] = kk == 0
                elif bk == bq:
                    if kq == 0:
                        row[j] = tk <= tq if kk == 0 else tk > tq
                    else:
                        row[j] = tk < tq if kk == 0 else tk >= tq
            rows.append(row)
    return torch.tensor(rows, dtype=torch.bool).reshape(len(rows), max_q)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_reqs", [1, 37])
@pytest.mark.parametrize("block", [4, 8, 16])
@pytest.mark.parametrize("max_q_delta", [0, 3, -2])
def test_ref_token_mask(device, num_reqs, block, max_q_delta):
    labels = _random_layout(num_reqs, block, seed=num_reqs * 100 + block)
    qsl, kind, step, blk = ops.simsd_layout(labels, device=device)
    max_q = max(0, int(qsl.diff().max()) + max_q_delta)  # larger pads, smaller truncates
    ref = ops.ref_token_mask_ref(qsl, kind, step, blk, max_q)
    assert torch.equal(ref.cpu(), _mask_oracle(labels, max_q))
    if ops.HAS_C:
        out = _compiled("ref_token_mask", device)(qsl, kind, step, blk, max_q)
        assert out.dtype == torch.bool and out.shape == (kind.shape[0], max_q)
        assert torch.equal(out, ref)
    assert torch.equal(ops.ref_token_mask(qsl, kind, step, blk, max_q), ref)


def test_ref_token_mask_rules():
    # one block of B=4: ranks 0..3 labels [0 (known), 2, 1, 5 (never unmasked)], then block 1
    qsl, kind, step, blk = ops.simsd_layout([[[0, 2, 1, 5], [1, 1]]])
    m = ops.ref_token_mask(qsl, kind, step, blk, 12)
    assert m.diagonal().all(), "every token sees itself"
    # data@2 (row 1): data <= 2 -> ranks 0,1,2; masks > 2 -> copy of rank 3
    assert m[1, :8].tolist() == [True, True, True, False, False, False, False, True]
    # mask@2 (row 5): data < 2 -> ranks 0,2; masks >= 2 -> copies of ranks 1,3
    assert m[5, :8].tolist() == [True, False, True, False, False, True, False, True]
    # block 1 sees block 0's data only; block 0 sees nothing of block 1
    assert m[8:, :4].all() and not m[8:, 4:8].any() and not m[:8, 8:].any()


def test_ref_token_mask_empty():
    qsl = torch.zeros(4, dtype=torch.int64)
    e = torch.zeros(0, dtype=torch.int64)
    assert ops.ref_token_mask_ref(qsl, e, e, e, 0).shape == (0, 0)
    if ops.HAS_C:
        assert torch.ops.dllm_spec.ref_token_mask(qsl, e, e, e, 5).shape == (0, 5)


def test_expand_with_prefix():
    qsl, kind, step, blk = ops.simsd_layout([[[1, 2]], [[0, 1, 1]]])
    rows = ops.ref_token_mask(qsl, kind, step, blk, 6)
    dense = ops.expand_with_prefix(rows[4:10], q_len=6, prefix_len=3)
    assert dense.shape == (6, 9) and dense[:, :3].all() and torch.equal(dense[:, 3:], rows[4:10])


# ----------------------------------------------------------------------------------------------
# 2. greedy_match and rejection_sample
# ----------------------------------------------------------------------------------------------
def _counts(num_reqs: int, max_k: int, case: str, g: torch.Generator):
    num_draft = torch.randint(0, max_k + 1, (num_reqs,), generator=g)
    if case == "empty":
        num_draft.zero_()
    elif case in ("all", "full"):
        num_draft.fill_(max_k)
    extra = torch.randint(-1, 2, (num_reqs,), generator=g)  # num_target = num_draft + {-1, 0, 1}
    num_target = (num_draft + extra).clamp(0, max_k + 1)
    if case == "all":
        num_target = num_draft + 1
    return num_draft, num_target


def _greedy_oracle(draft, nd, target, nt):
    acc, nxt = [], []
    for d, n, t, m in zip(draft.tolist(), nd.tolist(), target.tolist(), nt.tolist()):
        a = 0
        while a < min(n, m) and d[a] == t[a]:
            a += 1
        acc.append(a)
        nxt.append(t[a] if a < m else -1)
    return torch.tensor(acc, dtype=torch.int64), torch.tensor(nxt, dtype=torch.int64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_reqs", [1, 37])
@pytest.mark.parametrize("max_k", [0, 1, 4, 16])
@pytest.mark.parametrize("case", ["random", "all", "none", "empty", "full"])
def test_greedy_match(device, num_reqs, max_k, case):
    g = _gen(num_reqs * 31 + max_k)
    nd, nt = _counts(num_reqs, max_k, case, g)
    target = torch.randint(0, 3, (num_reqs, max_k + 1), generator=g)
    draft = torch.randint(0, 3, (num_reqs, max_k), generator=g)  # vocab 3: partial matches
    if case == "all":
        draft = target[:, :max_k].clone()
    elif case == "none":
        draft = target[:, :max_k] + 1
    args = [t.to(device) for t in (draft, nd, target, nt)]
    ref = ops.greedy_match_ref(*args)
    want = _greedy_oracle(draft, nd, target, nt)
    assert all(torch.equal(a.cpu(), b) for a, b in zip(ref, want))
    if case == "all":
        assert torch.equal(want[0], nd) and torch.equal(want[1], target.gather(1, nd[:, None])[:, 0])
    if case == "none":
        assert (want[0] == 0).all()
    if ops.HAS_C:
        out = _compiled("greedy_match", device)(*args)
        assert all(torch.equal(a, b) for a, b in zip(out, ref))
    assert all(torch.equal(a, b) for a, b in zip(ops.greedy_match(*args), ref))


def _probs(shape, g, dtype, zero_frac=0.3):
    logits = torch.randn(shape, generator=g, dtype=torch.float64) * 2
    logits[torch.rand(shape, generator=g) < zero_frac] = float("-inf")
    logits[..., 0] = logits[..., 0].clamp(min=-5)  # every row keeps some mass
    return logits.softmax(-1).to(dtype)


def _rejection_inputs(num_reqs, max_k, vocab, case, dtype, seed):
    g = _gen(seed)
    nd, nt = _counts(num_reqs, max_k, case, g)
    pd = _probs((num_reqs, max_k, vocab), g, dtype)
    pt = _probs((num_reqs, max_k + 1, vocab), g, dtype)
    draft = torch.randint(0, vocab, (num_reqs, max_k), generator=g)
    ua = torch.rand((num_reqs, max_k), generator=g, dtype=torch.float64).to(dtype)
    ur = torch.rand((num_reqs,), generator=g, dtype=torch.float64).to(dtype)
    if case == "all":  # p_target == p_draft: ratio 1 > u always
        pt[:, :max_k] = pd
        pd.scatter_(2, draft[..., None], 0.5)  # and no zero draft prob
        pt[:, :max_k] = pd
    elif case == "none":  # p_target(x) = 0: ratio 0, always rejected
        pt[:, :max_k].scatter_(2, draft[..., None], 0.0)
    elif case == "same_rows":  # rejections with an all-zero residual -> falls back to p_target
        pt[:, :max_k] = pd
        ua.fill_(0.999)
        pd.scatter_(2, draft[..., None], 0.0)
        pt[:, :max_k] = pd
        pt[:, :max_k].scatter_(2, draft[..., None], 0.0)
    elif case == "zero_draft_prob":  # p_draft(x) = 0: accept iff p_target(x) > 0
        pd.scatter_(2, draft[..., None], 0.0)
    return draft, nd, pd, pt, nt, ua, ur


def _rejection_oracle(draft, nd, pd, pt, nt, ua, ur):
    def sample(w, u):
        W = [int(torch.floor(torch.tensor(float(x), dtype=torch.float64) * 2**32)) for x in w]
        total = sum(W)
        if total == 0:
            return -1
        thr = int(torch.floor(torch.tensor(float(total), dtype=torch.float64) * float(u)))
        cum = 0
        for v, x in enumerate(W):
            cum += x
            if cum > thr:
                return v
        raise AssertionError("unreachable")

    acc, nxt = [], []
    for r in range(draft.shape[0]):
        lim, a = min(int(nd[r]), int(nt[r])), 0
        while a < lim:
            x = int(draft[r, a])
            if not bool(ua[r, a] < pt[r, a, x] / pd[r, a, x]):
                break
            a += 1
        tok = -1
        if a < lim:
            tok = sample((pt[r, a] - pd[r, a]).clamp_min(0).tolist(), ur[r])
            if tok < 0:
                tok = sample(pt[r, a].tolist(), ur[r])
        elif a < int(nt[r]):
            tok = sample(pt[r, a].tolist(), ur[r])
        acc.append(a)
        nxt.append(tok)
    return torch.tensor(acc, dtype=torch.int64), torch.tensor(nxt, dtype=torch.int64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("num_reqs,max_k,vocab", [(1, 0, 5), (1, 4, 1), (37, 3, 7), (37, 8, 50),
                                                  (5, 16, 300)])
@pytest.mark.parametrize("case", ["random", "all", "none", "empty", "full", "same_rows",
                                  "zero_draft_prob"])
def test_rejection_sample(device, dtype, num_reqs, max_k, vocab, case):
    inputs = _rejection_inputs(num_reqs, max_k, vocab, case, dtype, seed=num_reqs + 7 * max_k + vocab)
    args = [t.to(device) for t in inputs]
    ref = ops.rejection_sample_ref(*args)
    if device == "cpu" and num_reqs * max_k * vocab <= 20000:
        want = _rejection_oracle(*inputs)
        assert torch.equal(ref[0], want[0]) and torch.equal(ref[1], want[1])
    acc, nxt = ref
    lim = torch.minimum(args[1], args[4])
    if case == "all":
        assert torch.equal(acc, lim)
    if case == "none":
        assert (acc == 0).all()
    assert ((nxt >= -1) & (nxt < vocab)).all()
    if ops.HAS_C:
        out = _compiled("rejection_sample", device)(*args)
        assert torch.equal(out[0], acc) and torch.equal(out[1], nxt)
    out = ops.rejection_sample(*args)
    assert torch.equal(out[0], acc) and torch.equal(out[1], nxt)


@pytest.mark.parametrize("impl", ["ref", "csrc"])
def test_rejection_sample_distribution(impl):
    """Lossless: with x ~ p_draft, the first emitted token is distributed as p_target."""
    if impl == "csrc" and not ops.HAS_C:
        pytest.skip("_C not built")
    g = _gen(0)
    n, V = 40000, 6
    pd = torch.tensor([0.4, 0.3, 0.2, 0.1, 0.0, 0.0]).expand(n, 1, V).contiguous()
    pt_row = torch.tensor([0.1, 0.1, 0.3, 0.2, 0.3, 0.0])
    pt = pt_row.expand(n, 2, V).contiguous()
    draft = torch.multinomial(pd[:, 0], 1, generator=g)  # [n, 1]
    ones = torch.ones(n, dtype=torch.int64)
    ua, ur = torch.rand((n, 1), generator=g), torch.rand((n,), generator=g)
    fn = ops.rejection_sample_ref if impl == "ref" else torch.ops.dllm_spec.rejection_sample
    acc, nxt = fn(draft, ones, pd, pt, ones + 1, ua, ur)
    first = torch.where(acc > 0, draft[:, 0], nxt)
    freq = torch.bincount(first, minlength=V).double() / n
    tv = 0.5 * (freq - pt_row.double()).abs().sum()
    assert tv < TOL["sampling_total_variation"], (freq, tv)


# ----------------------------------------------------------------------------------------------
# 3. hierarchical acceptance
# ----------------------------------------------------------------------------------------------
def _hier_inputs(num_reqs, block, max_nodes, case, tree, seed):
    g = _gen(seed)
    base = torch.randint(0, 50, (num_reqs, block), generator=g)
    masked = torch.rand((num_reqs, block), generator=g) < 0.8
    masked[:, 0] = True  # at least one masked position per block
    base[masked] = MASK_ID
    verify = torch.randint(0, 50, (num_reqs, block), generator=g)
    num_nodes = torch.randint(0, max_nodes + 1, (num_reqs,), generator=g)
    if case == "full":
        num_nodes.fill_(max_nodes)
    nodes = torch.randint(0, 50, (num_reqs, max_nodes, block), generator=g)  # padding garbage
    parent = torch.full((num_reqs, max_nodes), 99, dtype=torch.int64)  # garbage in padding
    for r in range(num_reqs):
        for i in range(int(num_nodes[r])):
            p = int(torch.randint(-1, i, (1,), generator=g)) if tree else i - 1
            parent[r, i] = p
            state = (base[r] if p < 0 else nodes[r, p]).clone()
            still = (state == MASK_ID).nonzero().flatten()
            k = int(torch.randint(0, still.numel() + 1, (1,), generator=g)) if still.numel() else 0
            if case == "none" and p < 0:
                k = max(k, 1)  # a root that unmasks nothing would be vacuously consistent
            pick = still[torch.randperm(still.numel(), generator=g)[:k]]
            good = case in ("all", "full") or (case == "random" and torch.rand((), generator=g) < 0.8)
            if case == "none" and p < 0:
                good = False
            vals = verify[r, pick].clone()
            if not good and pick.numel():
                vals[0] += 1
            state[pick] = vals
            nodes[r, i] = state
    return base, nodes, parent, num_nodes, verify


def _hier_oracle(base, nodes, parent, num_nodes, verify):
    out = []
    for r in range(base.shape[0]):
        best, best_d, depth = -1, 0, {}
        for i in range(int(num_nodes[r])):
            p = int(parent[r, i])
            newpos = (base[r] == MASK_ID) & (nodes[r, i] != MASK_ID)
            ok = bool((nodes[r, i][newpos] == verify[r][newpos]).all()) and (p < 0 or depth[p] > 0)
            depth[i] = (1 if p < 0 else depth[p] + 1) if ok else 0
            if depth[i] > best_d:
                best, best_d = i, depth[i]
        new = 0 if best < 0 else int(((base[r] == MASK_ID) & (nodes[r, best] != MASK_ID)).sum())
        out.append((best, best_d, new))
    return tuple(torch.tensor(c, dtype=torch.int64) for c in zip(*out)) if out else None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_reqs", [1, 37])
@pytest.mark.parametrize("block", [4, 8, 16])
@pytest.mark.parametrize("max_nodes", [0, 1, 5])
@pytest.mark.parametrize("case", ["random", "all", "none", "full"])
@pytest.mark.parametrize("tree", [False, True], ids=["chain", "tree"])
def test_hierarchical_accept(device, num_reqs, block, max_nodes, case, tree):
    inputs = _hier_inputs(num_reqs, block, max_nodes, case, tree, seed=num_reqs + block + max_nodes)
    args = [t.to(device) for t in inputs]
    ref = ops.hierarchical_accept_ref(*args, MASK_ID)
    want = _hier_oracle(*inputs)
    assert all(torch.equal(a.cpu(), b) for a, b in zip(ref, want))
    if case == "none":
        assert (ref[0] == -1).all() and (ref[1] == 0).all()
    if case == "full" and not tree and max_nodes:
        assert (ref[1] == max_nodes).all() and (ref[0] == max_nodes - 1).all()
    if ops.HAS_C:
        out = _compiled("hierarchical_accept", device)(*args, MASK_ID)
        assert all(torch.equal(a, b) for a, b in zip(out, ref))
    if not tree:  # parent=None means the chain
        args[2] = None
    assert all(torch.equal(a, b) for a, b in zip(ops.hierarchical_accept(*args, MASK_ID), ref))


# ----------------------------------------------------------------------------------------------
# 4. graph acceptance
# ----------------------------------------------------------------------------------------------
def _graph_inputs(num_reqs, block, max_nodes, depth, case, seed, with_parent=False):
    """Random verified graphs. Tokens come from a 3-letter alphabet plus the mask, so equal node
    states (ties) occur; next states point at random nodes (several states may lead to one node:
    multi-parent DAGs; cycles too, which the walk's D bound ends), else at a fresh state."""
    g = _gen(seed)
    alphabet = torch.tensor([5, 6, MASK_ID])
    nodes = alphabet[torch.randint(0, 3, (num_reqs, max_nodes, block), generator=g)]
    num_nodes = torch.randint(0, max_nodes + 1, (num_reqs,), generator=g)
    if case == "full":
        num_nodes.fill_(max_nodes)
    if max_nodes >= 2:  # duplicated states: the smallest index must win
        nodes[:, 1] = nodes[:, 0]
    nxt = alphabet[torch.randint(0, 3, (num_reqs, max_nodes + 1, depth, block), generator=g)]
    hit = torch.rand((num_reqs, max_nodes + 1, depth), generator=g) < (0.97 if case == "full" else 0.7)
    if max_nodes:
        target = torch.randint(0, max_nodes, (num_reqs, max_nodes + 1, depth), generator=g)
        pointed = nodes[torch.arange(num_reqs)[:, None, None], target]  # [R, N+1, D, L]
        nxt = torch.where(hit[..., None], pointed, nxt)  # may point into the padding: never matches
    parent = None
    if with_parent:
        parent = torch.randint(-1, max(max_nodes, 1), (num_reqs, max_nodes), generator=g)
        parent = torch.minimum(parent, num_nodes[:, None] - 1)  # in [-1, num_nodes)
    return nodes, nxt, num_nodes, parent


def _graph_oracle(nodes, nxt, num_nodes, parent):
    """Per-request walk, written from the contract in CONTRACTS.md."""
    lens, paths = [], []
    D = nxt.shape[2]
    for r in range(nodes.shape[0]):
        cur, path = -1, []
        for d in range(D):
            want = nxt[r, cur + 1, d].tolist()
            match = next((n for n in range(int(num_nodes[r]))
                          if nodes[r, n].tolist() == want and (parent is None or int(parent[r, n]) == cur)), None)
            if match is None:
                break
            cur = match
            path.append(match)
        lens.append(len(path))
        paths.append(path + [-1] * (D - len(path)))
    return torch.tensor(lens, dtype=torch.int64), torch.tensor(paths, dtype=torch.int64).view(len(paths), D)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_reqs", [1, 37])
@pytest.mark.parametrize("block", [1, 4, 8])
@pytest.mark.parametrize("max_nodes,depth", [(0, 1), (1, 2), (5, 6), (7, 3)])
@pytest.mark.parametrize("case", ["random", "full"])
@pytest.mark.parametrize("with_parent", [False, True], ids=["any", "parent"])
def test_graph_accept(device, num_reqs, block, max_nodes, depth, case, with_parent):
    inputs = _graph_inputs(num_reqs, block, max_nodes, depth, case, seed=num_reqs * 7 + block + max_nodes,
                           with_parent=with_parent)
    args = [None if t is None else t.to(device) for t in inputs]
    ref = ops.graph_accept_ref(*args)
    want = _graph_oracle(*inputs)
    assert all(torch.equal(a.cpu(), b) for a, b in zip(ref, want))
    assert torch.equal(ref[0], (ref[1] >= 0).sum(1))
    if ops.HAS_C:
        out = _compiled("graph_accept", device)(*args)
        assert all(torch.equal(a, b) for a, b in zip(out, ref))
    assert all(torch.equal(a, b) for a, b in zip(ops.graph_accept(*args), ref))
    if case == "full" and max_nodes >= 2 and not with_parent and num_reqs > 1:
        assert int(ref[0].max()) >= 2  # the generator does produce multi-step walks


def test_graph_accept_rules():
    """Hand-made cases: ties take the smallest index, two states lead to one node (a DAG), the
    step count selects the next-state column, a parent restriction blocks a jump, zero nodes."""
    M = MASK_ID
    nodes = torch.tensor([[[1, M, M], [1, 2, M], [1, 2, M], [1, 2, 3]]])  # node 2 duplicates node 1
    nxt = torch.full((1, 5, 3, 3), -1)
    nxt[0, 0, 0] = torch.tensor([1, 2, M])  # root -> node 1 (not its duplicate 2), skipping node 0
    nxt[0, 1, 1] = torch.tensor([1, 2, 3])  # node 0 would lead to node 3 (a second parent of it)
    nxt[0, 2, 1] = torch.tensor([1, 2, 3])  # node 1 -> node 3 at step 1
    nxt[0, 2, 0] = torch.tensor([9, 9, 9])  # step 0 of node 1: never used
    num = torch.tensor([4])
    for fn in (ops.graph_accept_ref, ops.graph_accept):
        assert [t.tolist() for t in fn(nodes, nxt, num)] == [[2], [[1, 3, -1]]]
        assert [t.tolist() for t in fn(nodes, nxt, torch.tensor([3]))] == [[1], [[1, -1, -1]]]  # node 3 padding
        assert [t.tolist() for t in fn(nodes, nxt[:, :, :1], num)] == [[1], [[1]]]  # D = 1: one lookup
        chain = torch.tensor([[-1, 0, 1, 2]])  # PSD: node n entered only from n - 1
        assert [t.tolist() for t in fn(nodes, nxt, num, chain)] == [[0], [[-1, -1, -1]]]
        dag = torch.tensor([[-1, -1, 0, 1]])
        assert [t.tolist() for t in fn(nodes, nxt, num, dag)] == [[2], [[1, 3, -1]]]
        empty = fn(nodes[:, :0], nxt[:, :1], torch.tensor([0]))
        assert [t.tolist() for t in empty] == [[0], [[-1, -1, -1]]]


# ----------------------------------------------------------------------------------------------
# opcheck, input validation, fallback
# ----------------------------------------------------------------------------------------------
def _opcheck_cases():
    qsl, kind, step, blk = ops.simsd_layout(_random_layout(5, 4, seed=1))
    g = _gen(3)
    nd, nt = _counts(6, 4, "random", g)
    target = torch.randint(0, 3, (6, 5), generator=g)
    draft = torch.randint(0, 3, (6, 4), generator=g)
    return [
        ("ref_token_mask", (qsl, kind, step, blk, int(qsl.diff().max()))),
        ("greedy_match", (draft, nd, target, nt)),
        ("rejection_sample", _rejection_inputs(6, 4, 9, "random", torch.float32, seed=5)),
        ("hierarchical_accept", (*_hier_inputs(6, 8, 4, "random", True, seed=9), MASK_ID)),
        ("graph_accept", _graph_inputs(6, 4, 5, 4, "full", seed=2)),
        ("graph_accept", _graph_inputs(6, 4, 5, 4, "random", seed=3, with_parent=True)),
    ]


@needs_c
@pytest.mark.parametrize("name,args", _opcheck_cases(), ids=lambda x: x if isinstance(x, str) else "")
def test_opcheck(name, args):
    torch.library.opcheck(getattr(torch.ops.dllm_spec, name).default, args)


@needs_c
def test_invalid_inputs_raise():
    d = torch.zeros((2, 3), dtype=torch.int64)
    with pytest.raises(RuntimeError, match="num_draft"):
        torch.ops.dllm_spec.greedy_match(d, torch.tensor([4, 0]), torch.zeros((2, 4), dtype=torch.int64),
                                         torch.tensor([1, 1]))
    with pytest.raises(RuntimeError, match="int64"):
        torch.ops.dllm_spec.greedy_match(d.int(), torch.tensor([1, 0]), torch.zeros((2, 4), dtype=torch.int64),
                                         torch.tensor([1, 1]))
    with pytest.raises(RuntimeError, match="query_start_loc"):
        e = torch.zeros(3, dtype=torch.int64)
        torch.ops.dllm_spec.ref_token_mask(torch.tensor([0, 2]), e, e, e, 3)
    base, nodes, parent, nn, ver = _hier_inputs(2, 4, 3, "full", False, seed=0)
    parent[0, 1] = 1  # not < i
    with pytest.raises(RuntimeError, match="parent"):
        torch.ops.dllm_spec.hierarchical_accept(base, nodes, parent, nn, ver, MASK_ID)
    nodes, nxt, nn, parent = _graph_inputs(2, 4, 3, 2, "full", seed=0, with_parent=True)
    with pytest.raises(RuntimeError, match="next_states must be"):
        torch.ops.dllm_spec.graph_accept(nodes, nxt[:, :3], nn, parent)
    with pytest.raises(RuntimeError, match=r"num_nodes\[1\] = 4"):
        torch.ops.dllm_spec.graph_accept(nodes, nxt, torch.tensor([3, 4]), parent)
    parent[0, 0] = 3  # not a state of the request (num_nodes = 3)
    with pytest.raises(RuntimeError, match=r"parent\[0, 0\] = 3"):
        torch.ops.dllm_spec.graph_accept(nodes, nxt, nn, parent)


def test_fallback_without_extension():
    """With _C absent or DLLM_SPEC_FORCE_REF=1 the package imports and uses the *_ref twins."""
    code = ("from vllm_dllm_spec import ops; import torch; "
            "print(ops.BACKEND); "
            "print(ops.greedy_match(torch.tensor([[1, 2]]), torch.tensor([2]), "
            "torch.tensor([[1, 3, 4]]), torch.tensor([3])))")
    env = dict(os.environ, DLLM_SPEC_FORCE_REF="1")
    res = subprocess.run([str(Path(os.sys.executable)), "-c", code], capture_output=True, text=True,
                         env=env, timeout=120, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[0] == "ref"
    assert "tensor([1]), tensor([3])" in res.stdout


# ----------------------------------------------------------------------------------------------
# CUDA sources compile (nvcc -c against the torch headers); runs wherever nvcc exists
# ----------------------------------------------------------------------------------------------
def nvcc_compile_command(src: str, out: str) -> list[str]:
    """The compile check CI runs (also documented in docs/CONTRACTS.md)."""
    from torch.utils.cpp_extension import include_paths

    incs = include_paths() + [sysconfig.get_paths()["include"]]
    # A CPU build of torch ships the c10/cuda and ATen/cuda headers but not the generated
    # c10/cuda/impl/cuda_cmake_macros.h (it only sets Windows DLL-export macros): skip it there.
    has_cmake_macros = any(Path(p, "c10/cuda/impl/cuda_cmake_macros.h").is_file() for p in incs)
    extra = [] if has_cmake_macros else ["-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE"]
    return ["nvcc", "-c", src, "-o", out, "-std=c++17", "-O1", "-DDLLM_SPEC_WITH_CUDA=1", *extra,
            "-D_GLIBCXX_USE_CXX11_ABI=" + str(int(torch._C._GLIBCXX_USE_CXX11_ABI)),
            "-DTORCH_EXTENSION_NAME=_C", "-arch=sm_90", "-Xcompiler", "-fPIC",
            "--expt-relaxed-constexpr", *[f"-I{p}" for p in incs]]


CU_SOURCES = sorted(glob.glob(str(ROOT / "csrc" / "cuda" / "*.cu")))


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
@pytest.mark.parametrize("src", CU_SOURCES, ids=[Path(s).name for s in CU_SOURCES])
def test_cuda_sources_compile(src, tmp_path):
    res = subprocess.run(nvcc_compile_command(src, str(tmp_path / "out.o")), capture_output=True,
                         text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
