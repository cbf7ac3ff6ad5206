"""Python front of the `dllm_spec` C++/CUDA operators (csrc/), with a PyTorch `*_ref` twin
beside each one.

Contracts (shapes, dtypes, exact semantics): docs/CONTRACTS.md, section "csrc operators".
The `*_ref` functions are the executable specification: every compiled op must equal its twin
exactly (integer or bool outputs), `region_attention` within tests/tolerances.py (float output).

Which implementation runs: `BACKEND` is "csrc" when `vllm_dllm_spec._C` loaded (CPU kernels
always; CUDA kernels when the extension was built with nvcc against a CUDA torch), else "ref"
(`_C` missing: every public function falls back to its `*_ref`; `C_LOAD_ERROR` says why).
A tensor on a device without a compiled kernel also falls back to the `*_ref` (pure PyTorch,
runs anywhere). `DLLM_SPEC_FORCE_REF=1` forces the fallback everywhere.
"""
from __future__ import annotations

import logging
import math
import os

import torch

logger = logging.getLogger(__name__)

KIND_DATA = 0  # draft data token of the SimSD verify layout
KIND_MASK = 1  # mask copy (same RoPE position and label as the data token of its rank)
PROB_SCALE = 2**32  # fixed-point scale of the quantized sampling weights (csrc/dllm_spec.h)


def _load_c() -> tuple[bool, str | None]:
    try:
        from vllm_dllm_spec import _C  # noqa: F401  (loading registers torch.ops.dllm_spec)
    except ImportError as e:  # not built (no compiler / DLLM_SPEC_NO_EXT=1) or ABI mismatch
        return False, f"{type(e).__name__}: {e}"
    return True, None


HAS_C, C_LOAD_ERROR = _load_c()
FORCE_REF = os.environ.get("DLLM_SPEC_FORCE_REF") == "1"
BACKEND = "csrc" if HAS_C and not FORCE_REF else "ref"
if not HAS_C:
    logger.info("vllm_dllm_spec._C not loaded (%s); ops use the PyTorch *_ref twins", C_LOAD_ERROR)


def has_kernel(op: str, device: torch.device | str) -> bool:
    """Whether `dllm_spec::<op>` has a compiled kernel for `device` (e.g. "cpu", "cuda")."""
    if not HAS_C:
        return False
    key = torch.device(device).type.upper()
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"dllm_spec::{op}", key)


def _use_c(op: str, t: torch.Tensor) -> bool:
    return BACKEND == "csrc" and has_kernel(op, t.device)


# ----------------------------------------------------------------------------------------------
# Fake (meta) implementations: shapes only, for torch.compile / FakeTensor tracing.
# ----------------------------------------------------------------------------------------------
if HAS_C:

    @torch.library.register_fake("dllm_spec::ref_token_mask")
    def _ref_token_mask_fake(query_start_loc, kind, step, block_idx, max_q):
        return kind.new_empty((kind.shape[0], max_q), dtype=torch.bool)

    @torch.library.register_fake("dllm_spec::greedy_match")
    def _greedy_match_fake(draft_token_ids, num_draft, target_token_ids, num_target):
        return num_draft.new_empty(num_draft.shape), num_draft.new_empty(num_draft.shape)

    @torch.library.register_fake("dllm_spec::rejection_sample")
    def _rejection_sample_fake(draft_token_ids, num_draft, draft_probs, target_probs, num_target,
                               uniform_accept, uniform_recover):
        return num_draft.new_empty(num_draft.shape), num_draft.new_empty(num_draft.shape)

    @torch.library.register_fake("dllm_spec::hierarchical_accept")
    def _hierarchical_accept_fake(base_tokens, node_tokens, parent, num_nodes, verify_tokens,
                                  mask_id):
        shape = num_nodes.shape
        return num_nodes.new_empty(shape), num_nodes.new_empty(shape), num_nodes.new_empty(shape)

    @torch.library.register_fake("dllm_spec::region_attention")
    def _region_attention_fake(query, key, value, region_index, kind, step, block_idx, k_cache, v_cache,
                               block_table, prefix_len, scale):
        return query.new_empty((*region_index.shape, query.shape[1], query.shape[2]))

    @torch.library.register_fake("dllm_spec::graph_accept")
    def _graph_accept_fake(node_states, next_states, num_nodes, parent):
        return num_nodes.new_empty(num_nodes.shape), num_nodes.new_empty((num_nodes.shape[0], next_states.shape[2]))


# ----------------------------------------------------------------------------------------------
# 1. SimSD reference-token mask
# ----------------------------------------------------------------------------------------------
def ref_token_mask_ref(query_start_loc: torch.Tensor, kind: torch.Tensor, step: torch.Tensor,
                       block_idx: torch.Tensor, max_q: int) -> torch.Tensor:
    """Visibility among each request's query tokens (the cached prefix is always visible).

    query_start_loc [num_reqs + 1], kind/step/block_idx [num_tokens] (int64, packed)
    -> bool [num_tokens, max_q]: out[q, j] = query token q sees key j of its own request's query
    region (local index j); False for j >= that request's query length.
    """
    T = kind.shape[0]
    R = query_start_loc.shape[0] - 1
    dev = kind.device
    if T == 0 or max_q == 0:
        return torch.zeros((T, max_q), dtype=torch.bool, device=dev)
    q_len = query_start_loc.diff()  # [num_reqs]
    tok_req = torch.repeat_interleave(torch.arange(R, device=dev), q_len, output_size=T)  # [T]
    cols = torch.arange(max_q, device=dev)  # [max_q]
    valid = cols[None, :] < q_len[tok_req][:, None]  # [T, max_q]
    key = (query_start_loc[:-1][tok_req][:, None] + cols[None, :]).clamp(max=T - 1)  # [T, max_q]
    kk, sk, bk = kind[key], step[key], block_idx[key]  # [T, max_q]
    kq, sq, bq = kind[:, None], step[:, None], block_idx[:, None]  # [T, 1]
    k_data = kk == KIND_DATA
    same_block = torch.where(
        kq == KIND_DATA,
        torch.where(k_data, sk <= sq, sk > sq),  # data@t: data <= t, masks > t
        torch.where(k_data, sk < sq, sk >= sq),  # mask@t: data < t, masks >= t
    )
    vis = torch.where(bk == bq, same_block, (bk < bq) & k_data)  # earlier blocks: data only
    return vis & valid


def ref_token_mask(query_start_loc: torch.Tensor, kind: torch.Tensor, step: torch.Tensor,
                   block_idx: torch.Tensor, max_q: int) -> torch.Tensor:
    """See `ref_token_mask_ref`. bool [num_tokens, max_q]."""
    if _use_c("ref_token_mask", kind):
        return torch.ops.dllm_spec.ref_token_mask(query_start_loc, kind, step, block_idx, max_q)
    return ref_token_mask_ref(query_start_loc, kind, step, block_idx, max_q)


def simsd_layout(block_labels: list[list[list[int]]], device: torch.device | str = "cpu",
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Builds the packed verify layout from per-request, per-draft-block data-token labels.

    block_labels[r][b] = labels t_r of the data tokens of draft block b of request r (in
    position order; 0 = known before the draft, 1..B = unmasking step, B + 1 = never unmasked).
    Each block becomes `[data tokens | mask copies]`, the copies carrying the same labels.
    Returns (query_start_loc [num_reqs + 1], kind, step, block_idx [num_tokens]), all int64.
    Convenience for tests and set-up code: Python loops, not for a per-token hot path.
    """
    kind, step, blk, qsl = [], [], [], [0]
    for blocks in block_labels:
        for b, labels in enumerate(blocks):
            n = len(labels)
            kind += [KIND_DATA] * n + [KIND_MASK] * n
            step += list(labels) * 2
            blk += [b] * (2 * n)
        qsl.append(len(kind))

    def t(x):
        return torch.tensor(x, dtype=torch.int64, device=device)

    return t(qsl), t(kind), t(step), t(blk)


def expand_with_prefix(mask_rows: torch.Tensor, q_len: int, prefix_len: int) -> torch.Tensor:
    """Dense mask of ONE request for an SDPA-style kernel: rows of `ref_token_mask` for that
    request ([q_len, max_q]) -> bool [q_len, prefix_len + q_len] (prefix columns all True)."""
    prefix = mask_rows.new_ones((q_len, prefix_len))
    return torch.cat([prefix, mask_rows[:, :q_len]], dim=1)


# ----------------------------------------------------------------------------------------------
# 2. Verification: greedy match and rejection sampling
# ----------------------------------------------------------------------------------------------
def greedy_match_ref(draft_token_ids: torch.Tensor, num_draft: torch.Tensor,
                     target_token_ids: torch.Tensor, num_target: torch.Tensor,
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy verification in POSITION order.

    draft_token_ids [num_reqs, max_k], num_draft [num_reqs], target_token_ids [num_reqs,
    max_k + 1] (target argmax at each draft position, then one beyond), num_target [num_reqs]
    (valid target columns). -> accepted [num_reqs] = leading matches among the first
    min(num_draft, num_target) positions; next_token [num_reqs] = target[accepted] if
    accepted < num_target else -1.
    """
    K = draft_token_ids.shape[1]
    lim = torch.minimum(num_draft, num_target)  # [num_reqs]
    match = (draft_token_ids == target_token_ids[:, :K]).long()  # [num_reqs, max_k]
    accepted = torch.minimum(match.cumprod(dim=1).sum(dim=1), lim)  # [num_reqs]
    nxt = target_token_ids.gather(1, accepted[:, None]).squeeze(1)  # [num_reqs]
    return accepted, torch.where(accepted < num_target, nxt, torch.full_like(nxt, -1))


def greedy_match(draft_token_ids: torch.Tensor, num_draft: torch.Tensor,
                 target_token_ids: torch.Tensor, num_target: torch.Tensor,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """See `greedy_match_ref`. (accepted [num_reqs], next_token [num_reqs]), int64."""
    if _use_c("greedy_match", draft_token_ids):
        return torch.ops.dllm_spec.greedy_match(draft_token_ids, num_draft, target_token_ids,
                                                num_target)
    return greedy_match_ref(draft_token_ids, num_draft, target_token_ids, num_target)


def _quantize(w: torch.Tensor) -> torch.Tensor:
    """Sampling weights floor(max(w, 0) * 2^32) as int64 (exact in float64)."""
    return (w.double().clamp_min(0) * PROB_SCALE).floor().to(torch.int64)


def sample_quantized_ref(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling over int64 weights [n, V] with uniforms u [n] in [0, 1):
    first v with cumsum(W)[v] > floor(sum(W) * u) (float64 product); -1 where sum(W) == 0."""
    cdf = weights.cumsum(dim=1)  # [n, V]
    total = cdf[:, -1] if weights.shape[1] > 0 else weights.new_zeros(weights.shape[0])
    thr = (total.double() * u.double()).floor().to(torch.int64)  # [n]
    tok = (cdf <= thr[:, None]).sum(dim=1)  # [n] = first index with cdf > thr
    return torch.where(total > 0, tok, torch.full_like(tok, -1))


def rejection_sample_ref(draft_token_ids: torch.Tensor, num_draft: torch.Tensor,
                         draft_probs: torch.Tensor, target_probs: torch.Tensor,
                         num_target: torch.Tensor, uniform_accept: torch.Tensor,
                         uniform_recover: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative sampling (Leviathan et al. / Chen et al.) with given uniforms.

    draft_probs [num_reqs, max_k, V], target_probs [num_reqs, max_k + 1, V], uniform_accept
    [num_reqs, max_k], uniform_recover [num_reqs] (one float dtype); ids/counts as in
    `greedy_match_ref`. Draft i (i < min(num_draft, num_target)) is accepted iff
    u_i < p_target(x) / p_draft(x) in the probs dtype (p/0 = inf accepts, 0/0 = nan rejects).
    next_token: on the first rejection at a, sample floor(2^32 * max(0, p_target[a] -
    p_draft[a])) (or floor(2^32 * p_target[a]) if those weights are all 0) with
    uniform_recover; if all were accepted and a < num_target, sample the bonus from
    p_target[a]; -1 if there is nothing to sample (see CONTRACTS.md).
    """
    R, K = draft_token_ids.shape
    lim = torch.minimum(num_draft, num_target)  # [num_reqs]
    col = torch.arange(K, device=draft_token_ids.device)  # [max_k]
    x = torch.where(col[None, :] < lim[:, None], draft_token_ids, 0)  # [num_reqs, max_k]
    p = target_probs[:, :K].gather(2, x[..., None]).squeeze(2)  # [num_reqs, max_k]
    q = draft_probs.gather(2, x[..., None]).squeeze(2)  # [num_reqs, max_k]
    ok = (uniform_accept < p / q).long()  # [num_reqs, max_k]
    accepted = torch.minimum(ok.cumprod(dim=1).sum(dim=1), lim)  # [num_reqs]

    rejected = accepted < lim  # [num_reqs]
    rows = torch.arange(R, device=draft_token_ids.device)
    p_row = target_probs[rows, accepted]  # [num_reqs, V]
    if K > 0:
        q_row = draft_probs[rows, accepted.clamp(max=K - 1)]  # [num_reqs, V]
        residual = _quantize((p_row - q_row).clamp_min(0))  # [num_reqs, V]
    else:
        residual = torch.zeros_like(p_row, dtype=torch.int64)
    w_target = _quantize(p_row)  # [num_reqs, V]
    use_residual = rejected & (residual.sum(dim=1) > 0)  # [num_reqs]
    weights = torch.where(use_residual[:, None], residual, w_target)
    tok = sample_quantized_ref(weights, uniform_recover)  # [num_reqs]
    has_next = rejected | (accepted < num_target)
    return accepted, torch.where(has_next, tok, torch.full_like(tok, -1))


def rejection_sample(draft_token_ids: torch.Tensor, num_draft: torch.Tensor,
                     draft_probs: torch.Tensor, target_probs: torch.Tensor,
                     num_target: torch.Tensor, uniform_accept: torch.Tensor,
                     uniform_recover: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """See `rejection_sample_ref`. (accepted [num_reqs], next_token [num_reqs]), int64."""
    args = (draft_token_ids, num_draft, draft_probs, target_probs, num_target, uniform_accept,
            uniform_recover)
    if _use_c("rejection_sample", draft_token_ids):
        return torch.ops.dllm_spec.rejection_sample(*args)
    return rejection_sample_ref(*args)


# ----------------------------------------------------------------------------------------------
# 3. Hierarchical acceptance (PSD multi-depth drafts; Spiffy-style draft trees)
# ----------------------------------------------------------------------------------------------
def chain_parents(num_reqs: int, max_nodes: int, device: torch.device | str = "cpu"
                  ) -> torch.Tensor:
    """parent [num_reqs, max_nodes] of PSD's multi-depth drafts: node d-1 is depth d (a chain)."""
    par = torch.arange(-1, max_nodes - 1, dtype=torch.int64, device=device)
    return par.expand(num_reqs, max_nodes).contiguous()


def hierarchical_accept_ref(base_tokens: torch.Tensor, node_tokens: torch.Tensor,
                            parent: torch.Tensor, num_nodes: torch.Tensor,
                            verify_tokens: torch.Tensor, mask_id: int,
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Deepest draft node whose whole root path agrees with the verification predictions.

    base_tokens [num_reqs, L] (block before drafting, mask_id where masked), node_tokens
    [num_reqs, max_nodes, L] (full block state of each draft node), parent [num_reqs, max_nodes]
    (-1 = child of the base; parent[i] < i), num_nodes [num_reqs], verify_tokens [num_reqs, L]
    (target argmax per block position). Node i is consistent iff every position that is masked
    in base and unmasked in node i holds verify_tokens there; it is accepted-able iff it and all
    its ancestors are consistent. -> node [num_reqs] (deepest such node, smallest index on ties;
    -1 if none), depth [num_reqs] (its depth, 1 = child of base; 0 if none), num_new_tokens
    [num_reqs] (positions it unmasks relative to base; 0 if none).
    """
    R, N, L = node_tokens.shape
    dev = node_tokens.device
    if N == 0:
        zeros = num_nodes.new_zeros(R)
        return zeros - 1, zeros, zeros.clone()
    valid = torch.arange(N, device=dev)[None, :] < num_nodes[:, None]  # [num_reqs, max_nodes]
    new = (base_tokens[:, None, :] == mask_id) & (node_tokens != mask_id)  # [R, N, L]
    bad = (new & (node_tokens != verify_tokens[:, None, :])).any(dim=2)  # [R, N]
    ok = valid & ~bad  # [R, N]
    # pointer jumping over the parent forest: AND of `ok` and length along each root path
    anc = torch.where(valid, parent, -1)  # [R, N]
    depth = torch.ones_like(anc)  # [R, N]
    for _ in range(max(1, math.ceil(math.log2(max(N, 1)))) + 1):
        has = anc >= 0
        a = anc.clamp(min=0)
        ok = ok & torch.where(has, ok.gather(1, a), True)
        depth = depth + torch.where(has, depth.gather(1, a), 0)
        anc = torch.where(has, anc.gather(1, a), -1)
    score = torch.where(ok, depth, 0)  # [R, N]
    best_depth, best = score.max(dim=1)  # first maximal index on ties
    found = best_depth > 0
    num_new = new.gather(1, best[:, None, None].expand(R, 1, L)).squeeze(1).sum(dim=1)
    zero = torch.zeros_like(best)
    return (torch.where(found, best, zero - 1), torch.where(found, best_depth, zero),
            torch.where(found, num_new, zero))


def hierarchical_accept(base_tokens: torch.Tensor, node_tokens: torch.Tensor,
                        parent: torch.Tensor | None, num_nodes: torch.Tensor,
                        verify_tokens: torch.Tensor, mask_id: int,
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """See `hierarchical_accept_ref`; `parent=None` means PSD's chain of depths 1..max_nodes.
    (node, depth, num_new_tokens), each [num_reqs] int64."""
    if parent is None:
        parent = chain_parents(node_tokens.shape[0], node_tokens.shape[1], node_tokens.device)
    args = (base_tokens, node_tokens, parent, num_nodes, verify_tokens, int(mask_id))
    if _use_c("hierarchical_accept", base_tokens):
        return torch.ops.dllm_spec.hierarchical_accept(*args)
    return hierarchical_accept_ref(*args)


# ----------------------------------------------------------------------------------------------
# 4. Graph acceptance (Spiffy: draft states looked up by exact state equality; PSD: a chain)
# ----------------------------------------------------------------------------------------------
def graph_accept_ref(node_states: torch.Tensor, next_states: torch.Tensor, num_nodes: torch.Tensor,
                     parent: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The accepted path through a verified draft graph, batched over requests.

    node_states [num_reqs, N, L]: the drafted block states that were verified (node n);
    next_states [num_reqs, N + 1, D, L]: the real next state (the policy on the state's own
    verified logits) of the root (row 0) and of node n (row n + 1) when the walk stands on it
    after d steps (the step count picks the per-step unmask count); num_nodes [num_reqs];
    parent [num_reqs, N] or None: node n may be entered only from state parent[n] (-1 = the
    root), None = from any state. From the root, step d = 0, 1, .. looks up
    next_states[cur + 1, d] among the first num_nodes nodes by exact equality of all L tokens
    (smallest index on ties, parent permitting) and moves there; the walk stops at the first
    miss or after D steps. -> path_len [num_reqs] (nodes walked), path [num_reqs, D] (the node
    entered at step d, -1 from path_len on; the walk ends on path[path_len - 1], or the root).
    """
    R, N, L = node_states.shape
    D = next_states.shape[2]
    dev = node_states.device
    length = num_nodes.new_zeros(R)  # [R]
    path = num_nodes.new_full((R, D), -1)  # [R, D]
    if N == 0 or D == 0:
        return length, path
    eq = (next_states[:, :, :, None, :] == node_states[:, None, None, :, :]).all(-1)  # [R, N+1, D, N]
    eq &= (torch.arange(N, device=dev)[None, :] < num_nodes[:, None])[:, None, None, :]
    if parent is not None:
        source = torch.arange(-1, N, device=dev)  # [N + 1] the state of each next_states row
        eq &= (parent[:, None, :] == source[None, :, None])[:, :, None, :]
    succ = torch.where(eq.any(-1), eq.long().argmax(-1), -1)  # [R, N+1, D] first match, -1 none
    rows = torch.arange(R, device=dev)
    cur = length - 1  # [R] -1 = the root
    alive = torch.ones(R, dtype=torch.bool, device=dev)
    for d in range(D):  # a loop over walk steps (<= D), batched over requests
        nxt = succ[rows, cur + 1, d]  # [R]
        alive &= nxt >= 0
        cur = torch.where(alive, nxt, cur)
        path[:, d] = torch.where(alive, nxt, -1)
        length = torch.where(alive, d + 1, length)
    return length, path


def graph_accept(node_states: torch.Tensor, next_states: torch.Tensor, num_nodes: torch.Tensor,
                 parent: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """See `graph_accept_ref`. (path_len [num_reqs], path [num_reqs, D]), int64."""
    if _use_c("graph_accept", node_states):
        return torch.ops.dllm_spec.graph_accept(node_states, next_states, num_nodes, parent)
    return graph_accept_ref(node_states, next_states, num_nodes, parent)


# ----------------------------------------------------------------------------------------------
# 5. Region attention (SimSD / PSD / Spiffy verify rows on the paged KV cache)
# ----------------------------------------------------------------------------------------------
def block_copies_triples(num_reqs: int, num_copies: int, block_length: int,
                         device: torch.device | str = "cpu") -> tuple[torch.Tensor, ...]:
    """(kind, step, block_idx) [num_reqs, num_copies * block_length] of PSD's / Spiffy's block
    copies: every token a mask copy at step 0 of draft block `copy`. Under `ref_visible` that is
    the block-diagonal mask (a mask copy sees the copies of its own block with label >= its own,
    i.e. all of them, and no token of another block: earlier blocks show only data tokens)."""
    Q = num_copies * block_length
    blk = (torch.arange(Q, device=device) // block_length).expand(num_reqs, Q)
    zeros = torch.zeros_like(blk)
    return zeros + KIND_MASK, zeros, blk.clone()


def region_attention_ref(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         region_index: torch.Tensor, kind: torch.Tensor, step: torch.Tensor,
                         block_idx: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         block_table: torch.Tensor, prefix_len: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of the verify-region rows: gathered keys, a materialised mask, softmax.

    query [T, H, D], key/value [T, Hkv, D] (H % Hkv == 0; head h reads kv head h // (H / Hkv));
    region_index [R, Q]: the flat token of each region row; kind/step/block_idx [R, Q]: its
    (kind, step, block) triple; k_cache/v_cache [num_blocks, block_size, Hkv, D] (views of the
    paged cache); block_table [R, max_blocks]; prefix_len [R]. Region row i of request r sees the
    cached positions p < prefix_len[r] (slot block_table[r, p // block_size], p % block_size) and
    region token j iff ref_visible(triple i, triple j) (`ref_token_mask_ref`). Scores
    scale * q.k in fp32, softmax, fp32 weighted sum of values -> [R, Q, H, D] in query's dtype.
    """
    R, Q = region_index.shape
    H, D = query.shape[1:]
    G = H // key.shape[1]
    dev = query.device
    if R == 0 or Q == 0:
        return query.new_empty((R, Q, H, D))
    L = int(prefix_len.max())
    bs = k_cache.shape[1]
    pos = torch.arange(L, device=dev)  # [L]
    valid = pos[None, :] < prefix_len[:, None]  # [R, L]
    blk = block_table.gather(1, (pos // bs).clamp(max=max(block_table.shape[1] - 1, 0)).expand(R, L))
    blk = torch.where(valid, blk, 0)  # [R, L]; positions past a request's prefix are masked below
    pk, pv = k_cache[blk, pos % bs], v_cache[blk, pos % bs]  # [R, L, Hkv, D]
    keys = torch.cat([pk, key[region_index]], dim=1).repeat_interleave(G, dim=2).float()  # [R, L+Q, H, D]
    vals = torch.cat([pv, value[region_index]], dim=1).repeat_interleave(G, dim=2).float()
    region = ref_token_mask_ref(torch.arange(R + 1, device=dev) * Q, kind.flatten(), step.flatten(),
                                block_idx.flatten(), Q).view(R, Q, Q)
    mask = torch.cat([valid[:, None, :].expand(R, Q, L), region], dim=2)  # [R, Q, L + Q]
    scores = torch.einsum("rqhd,rkhd->rhqk", query[region_index].float(), keys) * scale  # [R, H, Q, L+Q]
    probs = scores.masked_fill(~mask[:, None], float("-inf")).softmax(-1)
    return torch.einsum("rhqk,rkhd->rqhd", probs, vals).to(query.dtype)


def region_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     region_index: torch.Tensor, kind: torch.Tensor, step: torch.Tensor,
                     block_idx: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     block_table: torch.Tensor, prefix_len: torch.Tensor, scale: float) -> torch.Tensor:
    """See `region_attention_ref`. [R, Q, H, D] in query's dtype; the mask is never built."""
    args = (query, key, value, region_index, kind, step, block_idx, k_cache, v_cache, block_table,
            prefix_len, float(scale))
    if _use_c("region_attention", query):
        return torch.ops.dllm_spec.region_attention(*args)
    return region_attention_ref(*args)


__all__ = [
    "BACKEND", "C_LOAD_ERROR", "HAS_C", "KIND_DATA", "KIND_MASK", "PROB_SCALE", "block_copies_triples",
    "chain_parents", "region_attention", "region_attention_ref",
    "expand_with_prefix", "graph_accept", "graph_accept_ref", "greedy_match", "greedy_match_ref", "has_kernel", "hierarchical_accept",
    "hierarchical_accept_ref", "ref_token_mask", "ref_token_mask_ref", "rejection_sample",
    "rejection_sample_ref", "sample_quantized_ref", "simsd_layout",
]
