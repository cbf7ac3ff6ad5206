// CPU implementations of the dllm_spec operators (one loop nest per request, parallel over
// requests with at::parallel_for). Semantics: docs/CONTRACTS.md, "csrc operators".
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../checks.h"
#include "../dllm_spec.h"

namespace dllm_spec {
namespace {

at::Tensor ref_token_mask_cpu(const at::Tensor& query_start_loc, const at::Tensor& kind,
                              const at::Tensor& step, const at::Tensor& block_idx,
                              int64_t max_q) {
  check_ref_token_mask(query_start_loc, kind, step, block_idx, max_q);
  const auto qsl_t = query_start_loc.contiguous();
  const auto kind_t = kind.contiguous(), step_t = step.contiguous(), blk_t = block_idx.contiguous();
  const int64_t R = qsl_t.numel() - 1, T = kind_t.numel();
  const int64_t* qsl = qsl_t.data_ptr<int64_t>();
  TORCH_CHECK(qsl[0] == 0 && qsl[R] == T, "query_start_loc must start at 0 and end at num_tokens = ",
              T, ", got ", qsl[0], " .. ", qsl[R]);
  for (int64_t r = 0; r < R; ++r) {
    TORCH_CHECK(qsl[r + 1] >= qsl[r], "query_start_loc must be non-decreasing");
  }
  auto out = at::zeros({T, max_q}, kind.options().dtype(at::kBool));  // [num_tokens, max_q]
  if (T == 0 || max_q == 0) return out;
  const int64_t* kd = kind_t.data_ptr<int64_t>();
  const int64_t* st = step_t.data_ptr<int64_t>();
  const int64_t* bk = blk_t.data_ptr<int64_t>();
  bool* o = out.data_ptr<bool>();
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, (T / std::max<int64_t>(R, 1)) * max_q));
  at::parallel_for(0, R, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t s = qsl[r], n = qsl[r + 1] - s, ncol = std::min(n, max_q);
      for (int64_t i = 0; i < n; ++i) {
        const int64_t q = s + i;
        bool* row = o + q * max_q;
        const int64_t kq = kd[q], sq = st[q], bq = bk[q];
        for (int64_t j = 0; j < ncol; ++j) {
          const int64_t k = s + j;
          row[j] = ref_visible(kq, sq, bq, kd[k], st[k], bk[k]);
        }
      }
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> greedy_match_cpu(const at::Tensor& draft_token_ids,
                                                    const at::Tensor& num_draft,
                                                    const at::Tensor& target_token_ids,
                                                    const at::Tensor& num_target) {
  const auto [R, K] = check_match_inputs(draft_token_ids, num_draft, target_token_ids, num_target);
  const auto dr_t = draft_token_ids.contiguous(), tg_t = target_token_ids.contiguous();
  const auto nd_t = num_draft.contiguous(), nt_t = num_target.contiguous();
  auto accepted = at::empty({R}, num_draft.options());    // [num_reqs]
  auto next_token = at::empty({R}, num_draft.options());  // [num_reqs]
  const int64_t *dr = dr_t.data_ptr<int64_t>(), *tg = tg_t.data_ptr<int64_t>();
  const int64_t *nd = nd_t.data_ptr<int64_t>(), *nt = nt_t.data_ptr<int64_t>();
  int64_t *acc = accepted.data_ptr<int64_t>(), *nxt = next_token.data_ptr<int64_t>();
  for (int64_t r = 0; r < R; ++r) {
    TORCH_CHECK(nd[r] >= 0 && nd[r] <= K, "num_draft[", r, "] = ", nd[r], " outside [0, ", K, "]");
    TORCH_CHECK(nt[r] >= 0 && nt[r] <= K + 1, "num_target[", r, "] = ", nt[r], " outside [0, ", K + 1, "]");
  }
  at::parallel_for(0, R, 256, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t lim = std::min(nd[r], nt[r]);
      const int64_t* d = dr + r * K;
      const int64_t* t = tg + r * (K + 1);
      int64_t a = 0;
      while (a < lim && d[a] == t[a]) ++a;
      acc[r] = a;
      nxt[r] = a < nt[r] ? t[a] : -1;
    }
  });
  return {accepted, next_token};
}

// Quantized weights buf[v] = floor(max(tp[v] - dp[v], 0) * 2^32) (dp == nullptr: of tp[v]) and
// their sum. Branch-free so that it vectorizes; on x86-64 with GCC it is also compiled for
// AVX-512 (vcvttpd2qq converts double -> int64 in vector registers) and picked at load time.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define DLLM_SPEC_CLONES __attribute__((target_clones("arch=x86-64-v4", "default")))
#else
#define DLLM_SPEC_CLONES
#endif
#define DLLM_SPEC_QUANTIZE(scalar_t)                                                         \
  DLLM_SPEC_CLONES int64_t quantize_weights(const scalar_t* __restrict__ tp,                \
                                            const scalar_t* __restrict__ dp,                \
                                            int64_t* __restrict__ buf, int64_t V) {         \
    int64_t total = 0;                                                                     \
    if (dp != nullptr) {                                                                   \
      for (int64_t v = 0; v < V; ++v) {                                                    \
        const scalar_t diff = tp[v] - dp[v];                                               \
        const double w = static_cast<double>(diff > scalar_t(0) ? diff : scalar_t(0));     \
        buf[v] = static_cast<int64_t>(w * kProbScale);                                     \
        total += buf[v];                                                                   \
      }                                                                                    \
    } else {                                                                               \
      for (int64_t v = 0; v < V; ++v) {                                                    \
        const scalar_t p = tp[v];                                                          \
        const double w = static_cast<double>(p > scalar_t(0) ? p : scalar_t(0));           \
        buf[v] = static_cast<int64_t>(w * kProbScale);                                     \
        total += buf[v];                                                                   \
      }                                                                                    \
    }                                                                                      \
    return total;                                                                          \
  }
DLLM_SPEC_QUANTIZE(float)
DLLM_SPEC_QUANTIZE(double)
#undef DLLM_SPEC_QUANTIZE

// Inverse-CDF sample over the quantized weights of max(tp - dp, 0) (dp == nullptr: of tp);
// -1 when they sum to 0. buf [V] is scratch.
template <typename scalar_t>
int64_t sample_quantized(const scalar_t* tp, const scalar_t* dp, int64_t V, double u, int64_t* buf) {
  const int64_t total = quantize_weights(tp, dp, buf, V);
  if (total <= 0) return -1;
  const int64_t thr = cdf_threshold(total, u);
  int64_t cum = 0;
  for (int64_t v = 0; v < V; ++v) {
    cum += buf[v];
    if (cum > thr) return v;
  }
  return V - 1;  // unreachable: thr < total
}

template <typename scalar_t>
void rejection_sample_kernel(int64_t R, int64_t K, int64_t V, const int64_t* dr, const int64_t* nd,
                             const scalar_t* pd, const scalar_t* pt, const int64_t* nt,
                             const scalar_t* ua, const scalar_t* ur, int64_t* acc, int64_t* nxt) {
  at::parallel_for(0, R, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> weights(V);  // [V] quantized sampling weights, reused per request
    int64_t* buf = weights.data();
    for (int64_t r = begin; r < end; ++r) {
      const int64_t lim = std::min(nd[r], nt[r]);
      int64_t a = 0;
      for (; a < lim; ++a) {
        const int64_t x = dr[r * K + a];
        const scalar_t p = pt[(r * (K + 1) + a) * V + x];
        const scalar_t q = pd[(r * K + a) * V + x];
        const scalar_t ratio = p / q;  // IEEE: p/0 = inf (accept), 0/0 = nan (reject)
        if (!(ua[r * K + a] < ratio)) break;
      }
      acc[r] = a;
      const double u = static_cast<double>(ur[r]);
      const scalar_t* tp = pt + (r * (K + 1) + a) * V;
      int64_t tok = -1;
      if (a < lim) {  // rejected at a: recover from max(0, p_target - p_draft), else p_target
        tok = sample_quantized<scalar_t>(tp, pd + (r * K + a) * V, V, u, buf);
        if (tok < 0) tok = sample_quantized<scalar_t>(tp, nullptr, V, u, buf);
      } else if (a < nt[r]) {  // all verifiable drafts accepted: bonus from p_target
        tok = sample_quantized<scalar_t>(tp, nullptr, V, u, buf);
      }
      nxt[r] = tok;
    }
  });
}

std::tuple<at::Tensor, at::Tensor> rejection_sample_cpu(
    const at::Tensor& draft_token_ids, const at::Tensor& num_draft, const at::Tensor& draft_probs,
    const at::Tensor& target_probs, const at::Tensor& num_target, const at::Tensor& uniform_accept,
    const at::Tensor& uniform_recover) {
  const auto [R, K, V] = check_rejection_inputs(draft_token_ids, num_draft, draft_probs, target_probs,
                                                num_target, uniform_accept, uniform_recover);
  const auto dr_t = draft_token_ids.contiguous(), nd_t = num_draft.contiguous();
  const auto nt_t = num_target.contiguous();
  const auto pd_t = draft_probs.contiguous(), pt_t = target_probs.contiguous();
  const auto ua_t = uniform_accept.contiguous(), ur_t = uniform_recover.contiguous();
  const int64_t *dr = dr_t.data_ptr<int64_t>(), *nd = nd_t.data_ptr<int64_t>();
  const int64_t* nt = nt_t.data_ptr<int64_t>();
  for (int64_t r = 0; r < R; ++r) {
    TORCH_CHECK(nd[r] >= 0 && nd[r] <= K, "num_draft[", r, "] = ", nd[r], " outside [0, ", K, "]");
    TORCH_CHECK(nt[r] >= 0 && nt[r] <= K + 1, "num_target[", r, "] = ", nt[r], " outside [0, ", K + 1, "]");
    for (int64_t i = 0; i < std::min(nd[r], nt[r]); ++i) {
      const int64_t x = dr[r * K + i];
      TORCH_CHECK(x >= 0 && x < V, "draft_token_ids[", r, ", ", i, "] = ", x, " outside [0, ", V, ")");
    }
  }
  auto accepted = at::empty({R}, num_draft.options());    // [num_reqs]
  auto next_token = at::empty({R}, num_draft.options());  // [num_reqs]
  AT_DISPATCH_FLOATING_TYPES(target_probs.scalar_type(), "rejection_sample_cpu", [&] {
    rejection_sample_kernel<scalar_t>(R, K, V, dr, nd, pd_t.data_ptr<scalar_t>(),
                                      pt_t.data_ptr<scalar_t>(), nt, ua_t.data_ptr<scalar_t>(),
                                      ur_t.data_ptr<scalar_t>(), accepted.data_ptr<int64_t>(),
                                      next_token.data_ptr<int64_t>());
  });
  return {accepted, next_token};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> hierarchical_accept_cpu(
    const at::Tensor& base_tokens, const at::Tensor& node_tokens, const at::Tensor& parent,
    const at::Tensor& num_nodes, const at::Tensor& verify_tokens, int64_t mask_id) {
  const auto [R, N, L] = check_hier_inputs(base_tokens, node_tokens, parent, num_nodes, verify_tokens);
  const auto base_c = base_tokens.contiguous(), nodes_c = node_tokens.contiguous();
  const auto par_c = parent.contiguous(), nn_c = num_nodes.contiguous(), ver_c = verify_tokens.contiguous();
  const int64_t *base = base_c.data_ptr<int64_t>(), *nodes = nodes_c.data_ptr<int64_t>();
  const int64_t *par = par_c.data_ptr<int64_t>(), *nn = nn_c.data_ptr<int64_t>();
  const int64_t* ver = ver_c.data_ptr<int64_t>();
  for (int64_t r = 0; r < R; ++r) {
    TORCH_CHECK(nn[r] >= 0 && nn[r] <= N, "num_nodes[", r, "] = ", nn[r], " outside [0, ", N, "]");
    for (int64_t i = 0; i < nn[r]; ++i) {
      const int64_t p = par[r * N + i];
      TORCH_CHECK(p >= -1 && p < i, "parent[", r, ", ", i, "] = ", p, " must be in [-1, ", i - 1, "]");
    }
  }
  auto out_node = at::empty({R}, num_nodes.options());   // [num_reqs]
  auto out_depth = at::empty({R}, num_nodes.options());  // [num_reqs]
  auto out_new = at::empty({R}, num_nodes.options());    // [num_reqs]
  int64_t *on = out_node.data_ptr<int64_t>(), *od = out_depth.data_ptr<int64_t>();
  int64_t* onew = out_new.data_ptr<int64_t>();
  at::parallel_for(0, R, 64, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> depth(N);  // 0 = not on an all-consistent path
    for (int64_t r = begin; r < end; ++r) {
      const int64_t* b = base + r * L;
      const int64_t* vt = ver + r * L;
      int64_t best = -1, best_depth = 0;
      for (int64_t i = 0; i < nn[r]; ++i) {
        const int64_t p = par[r * N + i];
        const int64_t pd = p < 0 ? 0 : depth[p];
        depth[i] = 0;
        if (p >= 0 && pd == 0) continue;  // an ancestor is inconsistent
        const int64_t* s = nodes + (r * N + i) * L;
        bool ok = true;
        for (int64_t j = 0; j < L && ok; ++j) {
          ok = !(b[j] == mask_id && s[j] != mask_id && s[j] != vt[j]);
        }
        if (!ok) continue;
        depth[i] = pd + 1;
        if (depth[i] > best_depth) best_depth = depth[i], best = i;
      }
      int64_t num_new = 0;
      if (best >= 0) {
        const int64_t* s = nodes + (r * N + best) * L;
        for (int64_t j = 0; j < L; ++j) num_new += (b[j] == mask_id && s[j] != mask_id);
      }
      on[r] = best;
      od[r] = best_depth;
      onew[r] = num_new;
    }
  });
  return {out_node, out_depth, out_new};
}

std::tuple<at::Tensor, at::Tensor> graph_accept_cpu(const at::Tensor& node_states,
                                                    const at::Tensor& next_states,
                                                    const at::Tensor& num_nodes,
                                                    const c10::optional<at::Tensor>& parent) {
  const auto [R, N, D, L] = check_graph_inputs(node_states, next_states, num_nodes, parent);
  const auto nodes_c = node_states.contiguous(), next_c = next_states.contiguous();
  const auto nn_c = num_nodes.contiguous();
  const at::Tensor par_c = parent.has_value() ? parent->contiguous() : at::Tensor();
  const int64_t *nodes = nodes_c.data_ptr<int64_t>(), *next = next_c.data_ptr<int64_t>();
  const int64_t* nn = nn_c.data_ptr<int64_t>();
  const int64_t* par = par_c.defined() ? par_c.data_ptr<int64_t>() : nullptr;
  for (int64_t r = 0; r < R; ++r) {
    TORCH_CHECK(nn[r] >= 0 && nn[r] <= N, "num_nodes[", r, "] = ", nn[r], " outside [0, ", N, "]");
    for (int64_t i = 0; par != nullptr && i < nn[r]; ++i) {
      const int64_t p = par[r * N + i];
      TORCH_CHECK(p >= -1 && p < nn[r], "parent[", r, ", ", i, "] = ", p, " must be in [-1, ",
                  nn[r] - 1, "]");
    }
  }
  auto path_len = at::empty({R}, num_nodes.options());  // [num_reqs]
  auto path = at::empty({R, D}, num_nodes.options());   // [num_reqs, D]
  int64_t *pl = path_len.data_ptr<int64_t>(), *pa = path.data_ptr<int64_t>();
  at::parallel_for(0, R, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      pl[r] = graph_walk(nodes + r * N * L, next + r * (N + 1) * D * L,
                         par == nullptr ? nullptr : par + r * N, nn[r], D, L, pa + r * D);
    }
  });
  return {path_len, path};
}

// ---------------------------------------------------------------------------------------------
// region_attention: per (request, kv head), the prefix keys/values (read through the block
// table) and the region's own are gathered once into fp32 scratch (keys transposed, [D, n_pad]);
// every query row of the H / Hkv heads sharing that kv head then attends over them with the
// reference-token mask evaluated per (query, key) by ref_visible. No [Q, Q] or [Q, L + Q] mask
// exists anywhere.
// ---------------------------------------------------------------------------------------------
constexpr int64_t kKeyTile = 16;  // keys per score vector (one zmm)
constexpr int64_t kRowTile = 4;   // query rows sharing each key load
typedef float v16f __attribute__((vector_size(64)));  // GCC/Clang vector extension: zmm in the v4 clone

inline v16f load16(const float* p) {
  v16f v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}

// Scores of kRowTile query rows q [kRowTile, D] against the transposed keys kt [D, n_pad]
// (n_pad a multiple of kKeyTile): s [kRowTile, n_pad] = q . k, vectorised over 16 keys at a time
// with no horizontal reduction, each key vector loaded once for the kRowTile rows.
DLLM_SPEC_CLONES void score_rows_f32(const float* __restrict__ q, int64_t D, const float* __restrict__ kt,
                                     int64_t n_pad, float* __restrict__ s) {
  const float *q0 = q, *q1 = q + D, *q2 = q + 2 * D, *q3 = q + 3 * D;
  for (int64_t j0 = 0; j0 < n_pad; j0 += kKeyTile) {
    v16f a0 = {}, a1 = {}, a2 = {}, a3 = {};
    for (int64_t d = 0; d < D; ++d) {
      const v16f k = load16(kt + d * n_pad + j0);
      a0 += q0[d] * k;
      a1 += q1[d] * k;
      a2 += q2[d] * k;
      a3 += q3[d] * k;
    }
    __builtin_memcpy(s + j0, &a0, sizeof a0);
    __builtin_memcpy(s + n_pad + j0, &a1, sizeof a1);
    __builtin_memcpy(s + 2 * n_pad + j0, &a2, sizeof a2);
    __builtin_memcpy(s + 3 * n_pad + j0, &a3, sizeof a3);
  }
}

typedef int32_t v16i __attribute__((vector_size(64)));

// exp of 16 floats <= 88 (Cephes' expf: range reduction by ln 2 in two parts, degree-6
// polynomial, 2^n through the exponent bits; ~1 ulp); x < -87 (masked keys: -inf) gives 0.
// libm's scalar expf does not vectorize without -ffast-math and dominated the kernel's time.
inline v16f exp16(v16f x) {
  const v16i tiny = x < -87.f;
  x = x < -87.f ? v16f{} - 87.f : x;
  x = x > 88.f ? v16f{} + 88.f : x;
  v16f fx = x * 1.44269504088896341f + 0.5f;
  v16i n = __builtin_convertvector(fx, v16i);  // truncation, then floor
  n = __builtin_convertvector(n, v16f) > fx ? n - 1 : n;
  fx = __builtin_convertvector(n, v16f);
  x = x - fx * 0.693359375f - fx * -2.12194440e-4f;
  v16f y = 1.9875691500e-4f * x + 1.3981999507e-3f;
  y = y * x + 8.3334519073e-3f;
  y = y * x + 4.1665795894e-2f;
  y = y * x + 1.6666665459e-1f;
  y = y * x + 5.0000001201e-1f;
  y = y * (x * x) + x + 1.f;
  const v16i bits = (n + 127) << 23;
  v16f pow2n;
  __builtin_memcpy(&pow2n, &bits, sizeof pow2n);
  y = y * pow2n;
  return tiny ? v16f{} : y;
}

// Row i's raw scores p [n_pad] (keys j < L: the prefix, always visible; key L + j: region token j,
// visible iff ref_visible(row i, j) on the request's triples kd / st / bk [Q]; j >= L + Q: padding)
// -> in place, the unnormalised softmax
// weights exp(scale * p - max) (0 at masked keys and padding); returns their sum. Softmax in fp32,
// vectorised over 16 keys.
DLLM_SPEC_CLONES float softmax_row_f32(float* __restrict__ p, int64_t L, int64_t Q, int64_t n_pad, int64_t i,
                                       const int64_t* kd, const int64_t* st, const int64_t* bk, float scale) {
  for (int64_t j0 = 0; j0 < n_pad; j0 += kKeyTile) {
    const v16f x = load16(p + j0) * scale;
    __builtin_memcpy(p + j0, &x, sizeof x);
  }
  for (int64_t j = 0; j < Q; ++j) {
    if (!ref_visible(kd[i], st[i], bk[i], kd[j], st[j], bk[j])) p[L + j] = -INFINITY;
  }
  for (int64_t j = L + Q; j < n_pad; ++j) p[j] = -INFINITY;
  v16f mv = v16f{} - INFINITY;
  for (int64_t j0 = 0; j0 < n_pad; j0 += kKeyTile) {
    const v16f x = load16(p + j0);
    mv = x > mv ? x : mv;
  }
  float m = mv[0];
  for (int u = 1; u < kKeyTile; ++u) m = std::max(m, mv[u]);
  v16f acc = {};
  for (int64_t j0 = 0; j0 < n_pad; j0 += kKeyTile) {
    const v16f e = exp16(load16(p + j0) - m);
    __builtin_memcpy(p + j0, &e, sizeof e);
    acc += e;
  }
  float sum = 0.f;
  for (int u = 0; u < kKeyTile; ++u) sum += acc[u];
  return sum;
}

// o [kRowTile, Dp] = w [kRowTile, n_pad] @ V [n, Dp] over the first n keys (Dp a multiple of 16):
// the accumulators stay in registers (4 rows x 4 vectors of 16 dims per pass, then 4 x 1), each
// value vector loaded once for the kRowTile rows.
static_assert(kRowTile == 4, "pv_rows_f32 accumulates exactly 4 rows");
DLLM_SPEC_CLONES void pv_rows_f32(const float* __restrict__ w, int64_t n, int64_t n_pad,
                                  const float* __restrict__ V, int64_t Dp, float* __restrict__ o) {
  const float *w0 = w, *w1 = w + n_pad, *w2 = w + 2 * n_pad, *w3 = w + 3 * n_pad;
  int64_t d0 = 0;
  for (; d0 + 4 * kKeyTile <= Dp; d0 += 4 * kKeyTile) {
    v16f a00 = {}, a01 = {}, a02 = {}, a03 = {}, a10 = {}, a11 = {}, a12 = {}, a13 = {};
    v16f a20 = {}, a21 = {}, a22 = {}, a23 = {}, a30 = {}, a31 = {}, a32 = {}, a33 = {};
    for (int64_t j = 0; j < n; ++j) {
      const float* v = V + j * Dp + d0;
      const v16f v0 = load16(v), v1 = load16(v + 16), v2 = load16(v + 32), v3 = load16(v + 48);
      const float x0 = w0[j], x1 = w1[j], x2 = w2[j], x3 = w3[j];
      a00 += x0 * v0, a01 += x0 * v1, a02 += x0 * v2, a03 += x0 * v3;
      a10 += x1 * v0, a11 += x1 * v1, a12 += x1 * v2, a13 += x1 * v3;
      a20 += x2 * v0, a21 += x2 * v1, a22 += x2 * v2, a23 += x2 * v3;
      a30 += x3 * v0, a31 += x3 * v1, a32 += x3 * v2, a33 += x3 * v3;
    }
    const v16f* acc[4][4] = {{&a00, &a01, &a02, &a03}, {&a10, &a11, &a12, &a13},
                             {&a20, &a21, &a22, &a23}, {&a30, &a31, &a32, &a33}};
    for (int r = 0; r < 4; ++r) {
      for (int c = 0; c < 4; ++c) __builtin_memcpy(o + r * Dp + d0 + c * 16, acc[r][c], sizeof(v16f));
    }
  }
  for (; d0 < Dp; d0 += kKeyTile) {
    v16f a0 = {}, a1 = {}, a2 = {}, a3 = {};
    for (int64_t j = 0; j < n; ++j) {
      const v16f v = load16(V + j * Dp + d0);
      a0 += w0[j] * v, a1 += w1[j] * v, a2 += w2[j] * v, a3 += w3[j] * v;
    }
    __builtin_memcpy(o + d0, &a0, sizeof a0);
    __builtin_memcpy(o + Dp + d0, &a1, sizeof a1);
    __builtin_memcpy(o + 2 * Dp + d0, &a2, sizeof a2);
    __builtin_memcpy(o + 3 * Dp + d0, &a3, sizeof a3);
  }
}

// dst[r * ld + c] = src[r * rs + c * cs] as fp32 for r < rows, c < cols; contiguous columns have
// their own loop so that it vectorizes (the bf16 / fp16 widening too, AVX-512 in the v4 clone).
#define DLLM_SPEC_LOAD_F32(scalar_t)                                                               \
  DLLM_SPEC_CLONES void load_f32(const scalar_t* __restrict__ src, int64_t rs, int64_t cs,          \
                                 int64_t rows, int64_t cols, float* __restrict__ dst, int64_t ld) { \
    for (int64_t r = 0; r < rows; ++r) {                                                           \
      const scalar_t* x = src + r * rs;                                                            \
      float* y = dst + r * ld;                                                                     \
      if (cs == 1) {                                                                               \
        for (int64_t c = 0; c < cols; ++c) y[c] = static_cast<float>(x[c]);                        \
      } else {                                                                                     \
        for (int64_t c = 0; c < cols; ++c) y[c] = static_cast<float>(x[c * cs]);                   \
      }                                                                                            \
    }                                                                                              \
  }
DLLM_SPEC_LOAD_F32(float)
DLLM_SPEC_LOAD_F32(double)
DLLM_SPEC_LOAD_F32(c10::BFloat16)
DLLM_SPEC_LOAD_F32(c10::Half)
#undef DLLM_SPEC_LOAD_F32

template <typename scalar_t>
void region_attention_kernel(const RegionDims& dm, const at::Tensor& query, const at::Tensor& key,
                             const at::Tensor& value, const int64_t* ri, const int64_t* kd,
                             const int64_t* st, const int64_t* bk, const at::Tensor& k_cache,
                             const at::Tensor& v_cache, const int64_t* bt, const int64_t* plen,
                             float scale, at::Tensor& out) {
  const int64_t R = dm.R, Q = dm.Q, H = dm.H, Hkv = dm.Hkv, D = dm.D, G = H / Hkv;
  const int64_t bs = dm.block_size, MB = dm.max_blocks;
  const int64_t Dp = (D + kKeyTile - 1) / kKeyTile * kKeyTile;  // value / output rows padded to vectors
  const int64_t rows = G * Q, rows_pad = (rows + kRowTile - 1) / kRowTile * kRowTile;
  const scalar_t *qp = query.data_ptr<scalar_t>(), *kp = key.data_ptr<scalar_t>(),
                 *vp = value.data_ptr<scalar_t>();
  const scalar_t *kc = k_cache.data_ptr<scalar_t>(), *vc = v_cache.data_ptr<scalar_t>();
  const auto qs = query.strides(), ks = key.strides(), vs = value.strides();
  const auto kcs = k_cache.strides(), vcs = v_cache.strides();
  scalar_t* op = out.data_ptr<scalar_t>();  // [R, Q, H, D] contiguous
  at::parallel_for(0, R * Hkv, 1, [&](int64_t begin, int64_t end) {
    // kt [D, n_pad] keys transposed, vbuf [n, Dp], qbuf [rows_pad, D] (padding rows stay 0),
    // sbuf [kRowTile, n_pad] scores then weights, obuf [kRowTile, Dp] output rows
    std::vector<float> kt, vbuf, qbuf(rows_pad * D, 0.f), sbuf, obuf(kRowTile * Dp);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r = task / Hkv, hk = task % Hkv, L = plen[r], n = L + Q;
      const int64_t n_pad = (n + kKeyTile - 1) / kKeyTile * kKeyTile;
      kt.resize(D * n_pad);  // padding columns give scores the softmax overwrites with -inf
      vbuf.resize(n * Dp);
      sbuf.resize(kRowTile * n_pad);
      for (int64_t p0 = 0; p0 < L; p0 += bs) {  // prefix: one cache block (of the table) at a time
        const int64_t blk = bt[r * MB + p0 / bs], cnt = std::min(bs, L - p0);
        const scalar_t* kb = kc + blk * kcs[0] + hk * kcs[2];
        load_f32(kb, kcs[3], kcs[1], D, cnt, &kt[p0], n_pad);  // [D, cnt] into columns p0..
        const scalar_t* vb = vc + blk * vcs[0] + hk * vcs[2];
        load_f32(vb, vcs[1], vcs[3], cnt, D, &vbuf[p0 * Dp], Dp);  // [cnt, D] into rows p0..
      }
      const int64_t* rr = ri + r * Q;
      for (int64_t j = 0; j < Q; ++j) {  // the region's own keys and values
        load_f32(kp + rr[j] * ks[0] + hk * ks[1], ks[2], 1, D, 1, &kt[L + j], n_pad);  // column L + j
        load_f32(vp + rr[j] * vs[0] + hk * vs[1], 0, vs[2], 1, D, &vbuf[(L + j) * Dp], Dp);
      }
      for (int64_t row = 0; row < rows; ++row) {  // row = g * Q + i: head hk * G + g, region row i
        load_f32(qp + rr[row % Q] * qs[0] + (hk * G + row / Q) * qs[1], 0, qs[2], 1, D, &qbuf[row * D], D);
      }
      for (int64_t r0 = 0; r0 < rows; r0 += kRowTile) {
        const int64_t r1 = std::min(r0 + kRowTile, rows);
        score_rows_f32(&qbuf[r0 * D], D, kt.data(), n_pad, sbuf.data());
        float inv[kRowTile];
        for (int64_t row = r0; row < r1; ++row) {
          inv[row - r0] = 1.f / softmax_row_f32(&sbuf[(row - r0) * n_pad], L, Q, n_pad, row % Q, kd + r * Q,
                                                st + r * Q, bk + r * Q, scale);
        }
        for (int64_t row = r1; row < r0 + kRowTile; ++row) {  // padding rows: zero weights
          std::fill_n(&sbuf[(row - r0) * n_pad], n_pad, 0.f);
        }
        pv_rows_f32(sbuf.data(), n, n_pad, vbuf.data(), Dp, obuf.data());
        for (int64_t row = r0; row < r1; ++row) {
          const int64_t g = row / Q, i = row % Q;
          scalar_t* o = op + ((r * Q + i) * H + hk * G + g) * D;
          const float* ob = &obuf[(row - r0) * Dp];
          for (int64_t d = 0; d < D; ++d) o[d] = static_cast<scalar_t>(ob[d] * inv[row - r0]);
        }
      }
    }
  });
}

at::Tensor region_attention_cpu(const at::Tensor& query, const at::Tensor& key,
                                const at::Tensor& value, const at::Tensor& region_index,
                                const at::Tensor& kind, const at::Tensor& step,
                                const at::Tensor& block_idx, const at::Tensor& k_cache,
                                const at::Tensor& v_cache, const at::Tensor& block_table,
                                const at::Tensor& prefix_len, double scale) {
  const RegionDims dm = check_region_attention(query, key, value, region_index, kind, step,
                                               block_idx, k_cache, v_cache, block_table, prefix_len);
  const auto ri_t = region_index.contiguous(), kd_t = kind.contiguous(), st_t = step.contiguous();
  const auto bk_t = block_idx.contiguous(), bt_t = block_table.contiguous(), pl_t = prefix_len.contiguous();
  const int64_t *ri = ri_t.data_ptr<int64_t>(), *bt = bt_t.data_ptr<int64_t>(), *pl = pl_t.data_ptr<int64_t>();
  const int64_t T = query.size(0);
  for (int64_t x = 0; x < dm.R * dm.Q; ++x) {
    TORCH_CHECK(ri[x] >= 0 && ri[x] < T, "region_index[", x / dm.Q, ", ", x % dm.Q, "] = ", ri[x],
                " outside [0, ", T, ")");
  }
  for (int64_t r = 0; r < dm.R; ++r) {
    TORCH_CHECK(pl[r] >= 0 && pl[r] <= dm.max_blocks * dm.block_size, "prefix_len[", r, "] = ", pl[r],
                " outside [0, max_blocks * block_size = ", dm.max_blocks * dm.block_size, "]");
    for (int64_t b = 0; b * dm.block_size < pl[r]; ++b) {
      const int64_t blk = bt[r * dm.max_blocks + b];
      TORCH_CHECK(blk >= 0 && blk < dm.num_blocks, "block_table[", r, ", ", b, "] = ", blk,
                  " outside [0, num_blocks = ", dm.num_blocks, ")");
    }
  }
  auto out = at::empty({dm.R, dm.Q, dm.H, dm.D}, query.options());  // [R, Q, H, D]
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, query.scalar_type(), "region_attention_cpu", [&] {
    region_attention_kernel<scalar_t>(dm, query, key, value, ri, kd_t.data_ptr<int64_t>(),
                                      st_t.data_ptr<int64_t>(), bk_t.data_ptr<int64_t>(), k_cache,
                                      v_cache, bt, pl, static_cast<float>(scale), out);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(dllm_spec, CPU, m) {
  m.impl("ref_token_mask", &ref_token_mask_cpu);
  m.impl("greedy_match", &greedy_match_cpu);
  m.impl("rejection_sample", &rejection_sample_cpu);
  m.impl("hierarchical_accept", &hierarchical_accept_cpu);
  m.impl("graph_accept", &graph_accept_cpu);
  m.impl("region_attention", &region_attention_cpu);
}

}  // namespace dllm_spec
