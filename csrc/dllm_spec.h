// Shared definitions of the dllm_spec operators (CPU and CUDA).
//
// Semantics of every operator are specified in docs/CONTRACTS.md, section "csrc operators";
// the PyTorch twins `*_ref` in vllm_dllm_spec/ops.py are the executable specification.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define DLLM_HD __host__ __device__ __forceinline__
#else
#define DLLM_HD inline
#endif

namespace dllm_spec {

// Token kinds of the SimSD verify layout.
constexpr int64_t kKindData = 0;
constexpr int64_t kKindMask = 1;

// Fixed-point scale used to quantize probabilities before inverse-CDF sampling: weight
// W = floor(w * 2^32) as int64. Integer sums are associative, so the sampled token does not
// depend on summation order (CPU loop, CUDA block scan, torch.cumsum all agree).
constexpr double kProbScale = 4294967296.0;  // 2^32

// SimSD reference-token visibility of key k for query q, both in the same request's query
// region (the cached prefix is always visible and is not described here).
//   kind: 0 = draft data token, 1 = mask copy; step: label; blk: draft block index in the round.
// Same block:  data@t sees data with label <= t and mask copies with label > t;
//              mask@t sees data with label <  t and mask copies with label >= t.
// Earlier block: only its data tokens.  Later block: nothing.
DLLM_HD bool ref_visible(int64_t kind_q, int64_t step_q, int64_t blk_q,
                         int64_t kind_k, int64_t step_k, int64_t blk_k) {
  if (blk_k > blk_q) return false;
  if (blk_k < blk_q) return kind_k == kKindData;
  if (kind_q == kKindData) {
    return kind_k == kKindData ? step_k <= step_q : step_k > step_q;
  }
  return kind_k == kKindData ? step_k < step_q : step_k >= step_q;
}

// Quantized sampling weight floor(w * 2^32) of a probability-like value w (0 for w <= 0 or
// NaN). For 0 < w * 2^32 < 2^63 the truncating conversion is floor (one instruction; std::floor
// is a libm call on baseline x86-64).
DLLM_HD int64_t quantize_prob(double w) {
  return w > 0.0 ? static_cast<int64_t>(w * kProbScale) : 0;
}

// Inverse-CDF threshold: the sampled index is the first v with cumsum(W)[v] > threshold.
// floor(total * u) for total >= 0 and u in [0, 1) (truncation == floor for non-negative values).
DLLM_HD int64_t cdf_threshold(int64_t total, double u) {
  const double x = static_cast<double>(total) * u;
  return x > 0.0 ? static_cast<int64_t>(x) : 0;
}

// Spiffy's acceptance walk over one request's draft graph (graph_accept). nodes [N, L] are the
// verified node states, next [(N + 1), D, L] the real next state of the root (row 0) / node n
// (row n + 1) when the walk stands on it after d steps, parent [N] (nullptr: no restriction)
// the only state node n may be entered from (-1 = the root). From the root, step d looks up
// next[cur + 1][d] among the first nn nodes by exact state equality (smallest index first,
// parent permitting) and moves there; the walk ends at the first miss or after D steps.
// Writes the nodes entered, path [D] (-1 after the end), and returns their number.
DLLM_HD int64_t graph_walk(const int64_t* nodes, const int64_t* next, const int64_t* parent,
                           int64_t nn, int64_t D, int64_t L, int64_t* path) {
  int64_t cur = -1, len = 0;
  for (int64_t d = 0; d < D; ++d) path[d] = -1;
  for (int64_t d = 0; d < D; ++d) {
    const int64_t* want = next + ((cur + 1) * D + d) * L;
    int64_t match = -1;
    for (int64_t n = 0; n < nn && match < 0; ++n) {
      if (parent != nullptr && parent[n] != cur) continue;
      const int64_t* s = nodes + n * L;
      bool eq = true;
      for (int64_t j = 0; j < L && eq; ++j) eq = s[j] == want[j];
      if (eq) match = n;
    }
    if (match < 0) break;
    cur = match;
    path[d] = match;
    len = d + 1;
  }
  return len;
}

}  // namespace dllm_spec
