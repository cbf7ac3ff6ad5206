// CUDA implementations of the dllm_spec operators. Built only when nvcc and a CUDA torch exist
// (setup.py). Semantics: docs/CONTRACTS.md, "csrc operators"; every kernel must equal the
// PyTorch twin `*_ref` in vllm_dllm_spec/ops.py exactly (integer/bool outputs).
// Value checks that need the data on the host (query_start_loc monotonic, counts in range,
// parent[i] < i, draft ids < V) are done by the CPU kernels only; on CUDA, out-of-contract
// values give unspecified (but memory-safe where cheap) results.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h: it needs cuBLAS/cuSPARSE headers
#include <torch/library.h>

#include "../checks.h"
#include "../dllm_spec.h"

namespace dllm_spec {
namespace {

constexpr int kThreads = 256;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---------------------------------------------------------------------------------------------
// 1. reference-token mask: one thread per output element (row q, local key column j)
// ---------------------------------------------------------------------------------------------
__global__ void ref_token_mask_kernel(const int64_t* __restrict__ qsl, int64_t R,
                                      const int64_t* __restrict__ kind,
                                      const int64_t* __restrict__ step,
                                      const int64_t* __restrict__ blk, int64_t T, int64_t max_q,
                                      bool* __restrict__ out) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= T * max_q) return;
  const int64_t q = idx / max_q, j = idx % max_q;
  // request of row q: the last r with qsl[r] <= q (binary search over num_reqs + 1 offsets)
  int64_t lo = 0, hi = R;  // invariant: qsl[lo] <= q < qsl[hi]
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) / 2;
    if (qsl[mid] <= q) lo = mid; else hi = mid;
  }
  const int64_t s = qsl[lo], n = qsl[lo + 1] - s;
  bool v = false;
  if (j < n) {
    const int64_t k = s + j;
    v = ref_visible(kind[q], step[q], blk[q], kind[k], step[k], blk[k]);
  }
  out[idx] = v;
}

at::Tensor ref_token_mask_cuda(const at::Tensor& query_start_loc, const at::Tensor& kind,
                               const at::Tensor& step, const at::Tensor& block_idx,
                               int64_t max_q) {
  check_ref_token_mask(query_start_loc, kind, step, block_idx, max_q);
  const c10::cuda::OptionalCUDAGuard guard(kind.device());
  const auto qsl = query_start_loc.contiguous();
  const auto kd = kind.contiguous(), st = step.contiguous(), bk = block_idx.contiguous();
  const int64_t R = qsl.numel() - 1, T = kd.numel();
  auto out = at::empty({T, max_q}, kind.options().dtype(at::kBool));  // [num_tokens, max_q]
  const int64_t total = T * max_q;
  if (total == 0 || R <= 0) return out.zero_();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  ref_token_mask_kernel<<<ceil_div(total, kThreads), kThreads, 0, stream>>>(
      qsl.data_ptr<int64_t>(), R, kd.data_ptr<int64_t>(), st.data_ptr<int64_t>(),
      bk.data_ptr<int64_t>(), T, max_q, out.data_ptr<bool>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// ---------------------------------------------------------------------------------------------
// 2a. greedy_match: one thread per request
// ---------------------------------------------------------------------------------------------
__global__ void greedy_match_kernel(const int64_t* __restrict__ draft,
                                    const int64_t* __restrict__ nd,
                                    const int64_t* __restrict__ target,
                                    const int64_t* __restrict__ nt, int64_t R, int64_t K,
                                    int64_t* __restrict__ acc, int64_t* __restrict__ nxt) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= R) return;
  const int64_t n_t = min(max(nt[r], int64_t(0)), K + 1);
  const int64_t lim = min(min(max(nd[r], int64_t(0)), K), n_t);
  const int64_t* d = draft + r * K;
  const int64_t* t = target + r * (K + 1);
  int64_t a = 0;
  while (a < lim && d[a] == t[a]) ++a;
  acc[r] = a;
  nxt[r] = a < n_t ? t[a] : -1;
}

std::tuple<at::Tensor, at::Tensor> greedy_match_cuda(const at::Tensor& draft_token_ids,
                                                     const at::Tensor& num_draft,
                                                     const at::Tensor& target_token_ids,
                                                     const at::Tensor& num_target) {
  const auto [R, K] = check_match_inputs(draft_token_ids, num_draft, target_token_ids, num_target);
  const c10::cuda::OptionalCUDAGuard guard(draft_token_ids.device());
  const auto dr = draft_token_ids.contiguous(), tg = target_token_ids.contiguous();
  const auto nd = num_draft.contiguous(), nt = num_target.contiguous();
  auto accepted = at::empty({R}, num_draft.options());    // [num_reqs]
  auto next_token = at::empty({R}, num_draft.options());  // [num_reqs]
  if (R == 0) return {accepted, next_token};
  const auto stream = c10::cuda::getCurrentCUDAStream();
  greedy_match_kernel<<<ceil_div(R, kThreads), kThreads, 0, stream>>>(
      dr.data_ptr<int64_t>(), nd.data_ptr<int64_t>(), tg.data_ptr<int64_t>(),
      nt.data_ptr<int64_t>(), R, K, accepted.data_ptr<int64_t>(), next_token.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {accepted, next_token};
}

// ---------------------------------------------------------------------------------------------
// 2b. rejection_sample: one thread block per request. Thread 0 runs the (short, sequential)
// acceptance loop; the inverse-CDF sample over the vocab is exact in int64 fixed point: each
// thread owns a contiguous vocab segment, segment sums are prefix-summed in shared memory, and
// the one thread whose segment crosses the threshold scans it for the token.
// ---------------------------------------------------------------------------------------------
template <typename scalar_t>
__device__ __forceinline__ double weight_of(const scalar_t* tp, const scalar_t* dp, int64_t v) {
  if (dp == nullptr) return static_cast<double>(tp[v]);
  const scalar_t diff = tp[v] - dp[v];
  return static_cast<double>(diff > scalar_t(0) ? diff : scalar_t(0));
}

// Block-wide inverse-CDF sample; every thread returns the same value (-1 when the weights are 0).
template <typename scalar_t>
__device__ int64_t block_sample(const scalar_t* tp, const scalar_t* dp, int64_t V, double u,
                                long long* seg_sum /* [blockDim.x + 1] shared */,
                                long long* result /* shared */) {
  const int64_t seg = (V + blockDim.x - 1) / blockDim.x;
  const int64_t lo = min(V, static_cast<int64_t>(threadIdx.x) * seg);
  const int64_t hi = min(V, lo + seg);
  long long s = 0;
  for (int64_t v = lo; v < hi; ++v) s += quantize_prob(weight_of(tp, dp, v));
  seg_sum[threadIdx.x + 1] = s;
  __syncthreads();
  if (threadIdx.x == 0) {
    seg_sum[0] = 0;
    for (unsigned i = 1; i <= blockDim.x; ++i) seg_sum[i] += seg_sum[i - 1];  // inclusive
    *result = -1;
  }
  __syncthreads();
  const long long total = seg_sum[blockDim.x];
  if (total > 0) {
    const long long thr = cdf_threshold(total, u);
    long long cum = seg_sum[threadIdx.x];
    if (cum <= thr && thr < seg_sum[threadIdx.x + 1]) {  // exactly one thread: thr < total
      for (int64_t v = lo; v < hi; ++v) {
        cum += quantize_prob(weight_of(tp, dp, v));
        if (cum > thr) { *result = v; break; }
      }
    }
  }
  __syncthreads();
  const int64_t out = *result;
  __syncthreads();  // seg_sum / result may be reused by the next call
  return out;
}

template <typename scalar_t>
__global__ void rejection_sample_kernel(const int64_t* __restrict__ draft,
                                        const int64_t* __restrict__ nd,
                                        const scalar_t* __restrict__ pd,
                                        const scalar_t* __restrict__ pt,
                                        const int64_t* __restrict__ nt,
                                        const scalar_t* __restrict__ ua,
                                        const scalar_t* __restrict__ ur, int64_t K, int64_t V,
                                        int64_t* __restrict__ acc, int64_t* __restrict__ nxt) {
  extern __shared__ long long smem[];  // [blockDim.x + 1] segment sums, then 2 scalars
  long long* seg_sum = smem;
  long long* result = smem + blockDim.x + 1;
  long long* accepted = smem + blockDim.x + 2;
  const int64_t r = blockIdx.x;
  const int64_t n_t = min(max(nt[r], int64_t(0)), K + 1);
  const int64_t lim = min(min(max(nd[r], int64_t(0)), K), n_t);
  if (threadIdx.x == 0) {
    int64_t a = 0;
    for (; a < lim; ++a) {
      const int64_t x = draft[r * K + a];
      if (x < 0 || x >= V) break;  // out of contract (checked on CPU); reject
      const scalar_t ratio = pt[(r * (K + 1) + a) * V + x] / pd[(r * K + a) * V + x];
      if (!(ua[r * K + a] < ratio)) break;  // IEEE: p/0 = inf accepts, 0/0 = nan rejects
    }
    *accepted = a;
  }
  __syncthreads();
  const int64_t a = *accepted;
  const double u = static_cast<double>(ur[r]);
  const scalar_t* tp = pt + (r * (K + 1) + a) * V;
  int64_t tok = -1;
  if (a < lim) {
    tok = block_sample<scalar_t>(tp, pd + (r * K + a) * V, V, u, seg_sum, result);
    if (tok < 0) tok = block_sample<scalar_t>(tp, nullptr, V, u, seg_sum, result);
  } else if (a < n_t) {
    tok = block_sample<scalar_t>(tp, nullptr, V, u, seg_sum, result);
  }
  if (threadIdx.x == 0) {
    acc[r] = a;
    nxt[r] = tok;
  }
}

std::tuple<at::Tensor, at::Tensor> rejection_sample_cuda(
    const at::Tensor& draft_token_ids, const at::Tensor& num_draft, const at::Tensor& draft_probs,
    const at::Tensor& target_probs, const at::Tensor& num_target, const at::Tensor& uniform_accept,
    const at::Tensor& uniform_recover) {
  const auto [R, K, V] = check_rejection_inputs(draft_token_ids, num_draft, draft_probs,
                                                target_probs, num_target, uniform_accept,
                                                uniform_recover);
  const c10::cuda::OptionalCUDAGuard guard(draft_token_ids.device());
  const auto dr = draft_token_ids.contiguous(), nd = num_draft.contiguous();
  const auto nt = num_target.contiguous();
  const auto pd = draft_probs.contiguous(), pt = target_probs.contiguous();
  const auto ua = uniform_accept.contiguous(), ur = uniform_recover.contiguous();
  auto accepted = at::empty({R}, num_draft.options());    // [num_reqs]
  auto next_token = at::empty({R}, num_draft.options());  // [num_reqs]
  if (R == 0) return {accepted, next_token};
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const size_t smem = (kThreads + 3) * sizeof(long long);
  AT_DISPATCH_FLOATING_TYPES(pt.scalar_type(), "rejection_sample_cuda", [&] {
    rejection_sample_kernel<scalar_t><<<R, kThreads, smem, stream>>>(
        dr.data_ptr<int64_t>(), nd.data_ptr<int64_t>(), pd.data_ptr<scalar_t>(),
        pt.data_ptr<scalar_t>(), nt.data_ptr<int64_t>(), ua.data_ptr<scalar_t>(),
        ur.data_ptr<scalar_t>(), K, V, accepted.data_ptr<int64_t>(),
        next_token.data_ptr<int64_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {accepted, next_token};
}

// ---------------------------------------------------------------------------------------------
// 3. hierarchical_accept: one thread per request (max_nodes x L is small: <= a few hundred)
// ---------------------------------------------------------------------------------------------
__global__ void hierarchical_accept_kernel(const int64_t* __restrict__ base,
                                           const int64_t* __restrict__ nodes,
                                           const int64_t* __restrict__ parent,
                                           const int64_t* __restrict__ num_nodes,
                                           const int64_t* __restrict__ verify, int64_t R,
                                           int64_t N, int64_t L, int64_t mask_id,
                                           int64_t* __restrict__ depth /* [R, N] scratch */,
                                           int64_t* __restrict__ out_node,
                                           int64_t* __restrict__ out_depth,
                                           int64_t* __restrict__ out_new) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= R) return;
  const int64_t* b = base + r * L;
  const int64_t* vt = verify + r * L;
  int64_t* dep = depth + r * N;
  const int64_t nn = min(max(num_nodes[r], int64_t(0)), N);
  int64_t best = -1, best_depth = 0;
  for (int64_t i = 0; i < nn; ++i) {
    const int64_t p = parent[r * N + i];
    const bool has_parent = p >= 0 && p < i;  // out-of-contract p >= i: treated as a root
    const int64_t pd = has_parent ? dep[p] : 0;
    dep[i] = 0;
    if (has_parent && pd == 0) continue;  // an ancestor is inconsistent
    const int64_t* s = nodes + (r * N + i) * L;
    bool ok = true;
    for (int64_t j = 0; j < L && ok; ++j) {
      ok = !(b[j] == mask_id && s[j] != mask_id && s[j] != vt[j]);
    }
    if (!ok) continue;
    dep[i] = pd + 1;
    if (dep[i] > best_depth) { best_depth = dep[i]; best = i; }
  }
  int64_t num_new = 0;
  if (best >= 0) {
    const int64_t* s = nodes + (r * N + best) * L;
    for (int64_t j = 0; j < L; ++j) num_new += (b[j] == mask_id && s[j] != mask_id);
  }
  out_node[r] = best;
  out_depth[r] = best_depth;
  out_new[r] = num_new;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> hierarchical_accept_cuda(
    const at::Tensor& base_tokens, const at::Tensor& node_tokens, const at::Tensor& parent,
    const at::Tensor& num_nodes, const at::Tensor& verify_tokens, int64_t mask_id) {
  const auto [R, N, L] = check_hier_inputs(base_tokens, node_tokens, parent, num_nodes,
                                           verify_tokens);
  const c10::cuda::OptionalCUDAGuard guard(base_tokens.device());
  const auto base = base_tokens.contiguous(), nodes = node_tokens.contiguous();
  const auto par = parent.contiguous(), nn = num_nodes.contiguous();
  const auto ver = verify_tokens.contiguous();
  auto out_node = at::empty({R}, num_nodes.options());   // [num_reqs]
  auto out_depth = at::empty({R}, num_nodes.options());  // [num_reqs]
  auto out_new = at::empty({R}, num_nodes.options());    // [num_reqs]
  if (R == 0) return {out_node, out_depth, out_new};
  auto depth = at::empty({R, std::max<int64_t>(N, 1)}, num_nodes.options());  // scratch
  const auto stream = c10::cuda::getCurrentCUDAStream();
  hierarchical_accept_kernel<<<ceil_div(R, kThreads), kThreads, 0, stream>>>(
      base.data_ptr<int64_t>(), nodes.data_ptr<int64_t>(), par.data_ptr<int64_t>(),
      nn.data_ptr<int64_t>(), ver.data_ptr<int64_t>(), R, N, L, mask_id,
      depth.data_ptr<int64_t>(), out_node.data_ptr<int64_t>(), out_depth.data_ptr<int64_t>(),
      out_new.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out_node, out_depth, out_new};
}

// ---------------------------------------------------------------------------------------------
// 4. graph_accept: one thread per request (the walk is at most D steps over N x L states)
// ---------------------------------------------------------------------------------------------
__global__ void graph_accept_kernel(const int64_t* __restrict__ nodes,
                                    const int64_t* __restrict__ next,
                                    const int64_t* __restrict__ num_nodes,
                                    const int64_t* __restrict__ parent, int64_t R, int64_t N,
                                    int64_t D, int64_t L, int64_t* __restrict__ path_len,
                                    int64_t* __restrict__ path) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= R) return;
  const int64_t nn = min(max(num_nodes[r], int64_t(0)), N);
  // an out-of-contract parent (outside [-1, nn)) never equals the walk's current state: the
  // node is simply unreachable, memory stays safe
  path_len[r] = graph_walk(nodes + r * N * L, next + r * (N + 1) * D * L,
                           parent == nullptr ? nullptr : parent + r * N, nn, D, L, path + r * D);
}

std::tuple<at::Tensor, at::Tensor> graph_accept_cuda(const at::Tensor& node_states,
                                                     const at::Tensor& next_states,
                                                     const at::Tensor& num_nodes,
                                                     const c10::optional<at::Tensor>& parent) {
  const auto [R, N, D, L] = check_graph_inputs(node_states, next_states, num_nodes, parent);
  const c10::cuda::OptionalCUDAGuard guard(node_states.device());
  const auto nodes = node_states.contiguous(), next = next_states.contiguous();
  const auto nn = num_nodes.contiguous();
  const at::Tensor par = parent.has_value() ? parent->contiguous() : at::Tensor();
  auto path_len = at::empty({R}, num_nodes.options());  // [num_reqs]
  auto path = at::empty({R, D}, num_nodes.options());   // [num_reqs, D]
  if (R == 0) return {path_len, path};
  const auto stream = c10::cuda::getCurrentCUDAStream();
  graph_accept_kernel<<<ceil_div(R, kThreads), kThreads, 0, stream>>>(
      nodes.data_ptr<int64_t>(), next.data_ptr<int64_t>(), nn.data_ptr<int64_t>(),
      par.defined() ? par.data_ptr<int64_t>() : nullptr, R, N, D, L,
      path_len.data_ptr<int64_t>(), path.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {path_len, path};
}

// ---------------------------------------------------------------------------------------------
// 5. region_attention: one block per (request, head, tile of kRegionRows query rows), one warp per
// row; each lane holds D / 32 elements of q and of the fp32 accumulator. Keys are visited in
// order (the prefix through the block table, then the region tokens ref_visible lets the row
// see), with an online softmax (running max and sum). No mask tensor is built.
// ---------------------------------------------------------------------------------------------
constexpr int kRegionRows = 4;      // warps (query rows) per block
constexpr int kMaxDPerLane = 8;     // head_dim <= 256

template <typename scalar_t>
__global__ void region_attention_kernel(
    const scalar_t* __restrict__ qp, int64_t qs0, int64_t qs1, int64_t qs2,
    const scalar_t* __restrict__ kp, int64_t ks0, int64_t ks1, int64_t ks2,
    const scalar_t* __restrict__ vp, int64_t vs0, int64_t vs1, int64_t vs2,
    const int64_t* __restrict__ ri, const int64_t* __restrict__ kd, const int64_t* __restrict__ st,
    const int64_t* __restrict__ bk, const scalar_t* __restrict__ kc, int64_t kcs0, int64_t kcs1,
    int64_t kcs2, int64_t kcs3, const scalar_t* __restrict__ vc, int64_t vcs0, int64_t vcs1,
    int64_t vcs2, int64_t vcs3, const int64_t* __restrict__ bt, const int64_t* __restrict__ plen,
    int64_t Q, int64_t H, int64_t Hkv, int64_t D, int64_t bs, int64_t MB, float scale,
    scalar_t* __restrict__ out) {
  const int64_t r = blockIdx.x / H, h = blockIdx.x % H, hk = h / (H / Hkv);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t i = static_cast<int64_t>(blockIdx.y) * kRegionRows + warp;
  if (i >= Q) return;
  const int64_t* rr = ri + r * Q;
  const int64_t kq = kd[r * Q + i], sq = st[r * Q + i], bq = bk[r * Q + i];
  float q[kMaxDPerLane], acc[kMaxDPerLane];
#pragma unroll
  for (int c = 0; c < kMaxDPerLane; ++c) {
    const int64_t d = lane + 32 * c;
    q[c] = d < D ? static_cast<float>(qp[rr[i] * qs0 + h * qs1 + d * qs2]) : 0.f;
    acc[c] = 0.f;
  }
  float m = -INFINITY, l = 0.f;
  const int64_t L = plen[r];
  for (int64_t j = 0; j < L + Q; ++j) {
    const scalar_t *k, *v;
    int64_t kst, vst;
    if (j < L) {
      const int64_t blk = bt[r * MB + j / bs], off = j % bs;
      k = kc + blk * kcs0 + off * kcs1 + hk * kcs2;
      v = vc + blk * vcs0 + off * vcs1 + hk * vcs2;
      kst = kcs3, vst = vcs3;
    } else {
      const int64_t x = r * Q + (j - L);
      if (!ref_visible(kq, sq, bq, kd[x], st[x], bk[x])) continue;  // uniform across the warp
      k = kp + rr[j - L] * ks0 + hk * ks1;
      v = vp + rr[j - L] * vs0 + hk * vs1;
      kst = ks2, vst = vs2;
    }
    float part = 0.f;
#pragma unroll
    for (int c = 0; c < kMaxDPerLane; ++c) {
      const int64_t d = lane + 32 * c;
      if (d < D) part += q[c] * static_cast<float>(k[d * kst]);
    }
#pragma unroll
    for (int o = 16; o > 0; o /= 2) part += __shfl_xor_sync(0xffffffffu, part, o);
    const float s = part * scale;
    const float m_new = fmaxf(m, s);
    const float corr = expf(m - m_new);  // 0 on the first key (m = -inf)
    const float p = expf(s - m_new);
    l = l * corr + p;
#pragma unroll
    for (int c = 0; c < kMaxDPerLane; ++c) {
      const int64_t d = lane + 32 * c;
      if (d < D) acc[c] = acc[c] * corr + p * static_cast<float>(v[d * vst]);
    }
    m = m_new;
  }
  scalar_t* o = out + ((r * Q + i) * H + h) * D;
#pragma unroll
  for (int c = 0; c < kMaxDPerLane; ++c) {
    const int64_t d = lane + 32 * c;
    if (d < D) o[d] = static_cast<scalar_t>(acc[c] / l);
  }
}

at::Tensor region_attention_cuda(const at::Tensor& query, const at::Tensor& key,
                                 const at::Tensor& value, const at::Tensor& region_index,
                                 const at::Tensor& kind, const at::Tensor& step,
                                 const at::Tensor& block_idx, const at::Tensor& k_cache,
                                 const at::Tensor& v_cache, const at::Tensor& block_table,
                                 const at::Tensor& prefix_len, double scale) {
  const RegionDims dm = check_region_attention(query, key, value, region_index, kind, step,
                                               block_idx, k_cache, v_cache, block_table, prefix_len);
  TORCH_CHECK(dm.D <= 32 * kMaxDPerLane, "region_attention on CUDA supports head_dim <= ",
              32 * kMaxDPerLane, ", got ", dm.D);
  const c10::cuda::OptionalCUDAGuard guard(query.device());
  const auto ri = region_index.contiguous(), kd = kind.contiguous(), st = step.contiguous();
  const auto bk = block_idx.contiguous(), bt = block_table.contiguous(), pl = prefix_len.contiguous();
  auto out = at::empty({dm.R, dm.Q, dm.H, dm.D}, query.options());  // [R, Q, H, D]
  if (out.numel() == 0) return out;
  const dim3 grid(static_cast<unsigned>(dm.R * dm.H), static_cast<unsigned>(ceil_div(dm.Q, kRegionRows)));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, query.scalar_type(), "region_attention_cuda", [&] {
    region_attention_kernel<scalar_t><<<grid, 32 * kRegionRows, 0, stream>>>(
        query.data_ptr<scalar_t>(), query.stride(0), query.stride(1), query.stride(2),
        key.data_ptr<scalar_t>(), key.stride(0), key.stride(1), key.stride(2),
        value.data_ptr<scalar_t>(), value.stride(0), value.stride(1), value.stride(2),
        ri.data_ptr<int64_t>(), kd.data_ptr<int64_t>(), st.data_ptr<int64_t>(), bk.data_ptr<int64_t>(),
        k_cache.data_ptr<scalar_t>(), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        k_cache.stride(3), v_cache.data_ptr<scalar_t>(), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2), v_cache.stride(3), bt.data_ptr<int64_t>(), pl.data_ptr<int64_t>(), dm.Q,
        dm.H, dm.Hkv, dm.D, dm.block_size, dm.max_blocks, static_cast<float>(scale),
        out.data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(dllm_spec, CUDA, m) {
  m.impl("ref_token_mask", &ref_token_mask_cuda);
  m.impl("greedy_match", &greedy_match_cuda);
  m.impl("rejection_sample", &rejection_sample_cuda);
  m.impl("hierarchical_accept", &hierarchical_accept_cuda);
  m.impl("graph_accept", &graph_accept_cuda);
  m.impl("region_attention", &region_attention_cuda);
}

}  // namespace dllm_spec
