// Host-side argument checks shared by the CPU and CUDA implementations (shapes and dtypes only;
// value checks that need the data live in the CPU implementation, see docs/CONTRACTS.md).
#pragma once

#include <ATen/ATen.h>

namespace dllm_spec {

inline void check_int64(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.scalar_type() == at::kLong, name, " must be int64, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == dim, name, " must be ", dim, "-D, got shape ", t.sizes());
}

inline void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* name) {
  TORCH_CHECK(a.device() == b.device(), name, " is on ", b.device(), ", expected ", a.device());
}

inline void check_ref_token_mask(const at::Tensor& qsl, const at::Tensor& kind,
                                 const at::Tensor& step, const at::Tensor& blk, int64_t max_q) {
  check_int64(qsl, "query_start_loc", 1);
  check_int64(kind, "kind", 1);
  check_int64(step, "step", 1);
  check_int64(blk, "block_idx", 1);
  TORCH_CHECK(qsl.numel() >= 1, "query_start_loc must have num_reqs + 1 >= 1 entries");
  TORCH_CHECK(step.numel() == kind.numel() && blk.numel() == kind.numel(),
              "kind, step, block_idx must have the same length");
  TORCH_CHECK(max_q >= 0, "max_q must be >= 0");
  check_same_device(qsl, kind, "kind");
  check_same_device(qsl, step, "step");
  check_same_device(qsl, blk, "block_idx");
}

// Returns (num_reqs, max_k).
inline std::pair<int64_t, int64_t> check_match_inputs(const at::Tensor& draft,
                                                      const at::Tensor& num_draft,
                                                      const at::Tensor& target,
                                                      const at::Tensor& num_target) {
  check_int64(draft, "draft_token_ids", 2);
  check_int64(num_draft, "num_draft", 1);
  check_int64(target, "target_token_ids", 2);
  check_int64(num_target, "num_target", 1);
  const int64_t R = draft.size(0), K = draft.size(1);
  TORCH_CHECK(num_draft.size(0) == R && num_target.size(0) == R,
              "num_draft and num_target must have num_reqs = ", R, " entries");
  TORCH_CHECK(target.size(0) == R && target.size(1) == K + 1,
              "target_token_ids must be [num_reqs, max_k + 1] = [", R, ", ", K + 1, "], got ",
              target.sizes());
  check_same_device(draft, num_draft, "num_draft");
  check_same_device(draft, target, "target_token_ids");
  check_same_device(draft, num_target, "num_target");
  return {R, K};
}

// Returns (num_reqs, max_k, vocab).
inline std::tuple<int64_t, int64_t, int64_t> check_rejection_inputs(
    const at::Tensor& draft, const at::Tensor& num_draft, const at::Tensor& draft_probs,
    const at::Tensor& target_probs, const at::Tensor& num_target, const at::Tensor& u_acc,
    const at::Tensor& u_rec) {
  check_int64(draft, "draft_token_ids", 2);
  check_int64(num_draft, "num_draft", 1);
  check_int64(num_target, "num_target", 1);
  const int64_t R = draft.size(0), K = draft.size(1);
  TORCH_CHECK(draft_probs.dim() == 3 && target_probs.dim() == 3,
              "draft_probs and target_probs must be 3-D");
  const int64_t V = target_probs.size(2);
  TORCH_CHECK(draft_probs.size(0) == R && draft_probs.size(1) == K && draft_probs.size(2) == V,
              "draft_probs must be [num_reqs, max_k, V] = [", R, ", ", K, ", ", V, "], got ",
              draft_probs.sizes());
  TORCH_CHECK(target_probs.size(0) == R && target_probs.size(1) == K + 1,
              "target_probs must be [num_reqs, max_k + 1, V], got ", target_probs.sizes());
  const auto dt = target_probs.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble, "probs must be float32 or float64, got ", dt);
  TORCH_CHECK(draft_probs.scalar_type() == dt && u_acc.scalar_type() == dt &&
                  u_rec.scalar_type() == dt,
              "draft_probs, target_probs, uniform_accept, uniform_recover must share one dtype");
  TORCH_CHECK(num_draft.size(0) == R && num_target.size(0) == R,
              "num_draft and num_target must have num_reqs entries");
  TORCH_CHECK(u_acc.dim() == 2 && u_acc.size(0) == R && u_acc.size(1) == K,
              "uniform_accept must be [num_reqs, max_k], got ", u_acc.sizes());
  TORCH_CHECK(u_rec.dim() == 1 && u_rec.size(0) == R, "uniform_recover must be [num_reqs]");
  for (const at::Tensor* t : {&num_draft, &draft_probs, &target_probs, &num_target, &u_acc, &u_rec}) {
    check_same_device(draft, *t, "rejection_sample input");
  }
  return {R, K, V};
}

// Returns (num_reqs, max_nodes, L).
inline std::tuple<int64_t, int64_t, int64_t> check_hier_inputs(const at::Tensor& base,
                                                               const at::Tensor& nodes,
                                                               const at::Tensor& parent,
                                                               const at::Tensor& num_nodes,
                                                               const at::Tensor& verify) {
  check_int64(base, "base_tokens", 2);
  check_int64(nodes, "node_tokens", 3);
  check_int64(parent, "parent", 2);
  check_int64(num_nodes, "num_nodes", 1);
  check_int64(verify, "verify_tokens", 2);
  const int64_t R = base.size(0), L = base.size(1), N = nodes.size(1);
  TORCH_CHECK(nodes.size(0) == R && nodes.size(2) == L,
              "node_tokens must be [num_reqs, max_nodes, L] with L = ", L, ", got ", nodes.sizes());
  TORCH_CHECK(parent.size(0) == R && parent.size(1) == N, "parent must be [num_reqs, max_nodes]");
  TORCH_CHECK(num_nodes.size(0) == R, "num_nodes must be [num_reqs]");
  TORCH_CHECK(verify.size(0) == R && verify.size(1) == L, "verify_tokens must be [num_reqs, L]");
  for (const at::Tensor* t : {&nodes, &parent, &num_nodes, &verify}) {
    check_same_device(base, *t, "hierarchical_accept input");
  }
  return {R, N, L};
}

// Returns (num_reqs, max_nodes, max_depth, L).
inline std::tuple<int64_t, int64_t, int64_t, int64_t> check_graph_inputs(
    const at::Tensor& nodes, const at::Tensor& next, const at::Tensor& num_nodes,
    const c10::optional<at::Tensor>& parent) {
  check_int64(nodes, "node_states", 3);
  check_int64(next, "next_states", 4);
  check_int64(num_nodes, "num_nodes", 1);
  const int64_t R = nodes.size(0), N = nodes.size(1), L = nodes.size(2);
  TORCH_CHECK(next.size(0) == R && next.size(1) == N + 1 && next.size(3) == L,
              "next_states must be [num_reqs, max_nodes + 1, max_depth, L] = [", R, ", ", N + 1,
              ", D, ", L, "], got ", next.sizes());
  TORCH_CHECK(num_nodes.size(0) == R, "num_nodes must be [num_reqs] = [", R, "]");
  check_same_device(nodes, next, "next_states");
  check_same_device(nodes, num_nodes, "num_nodes");
  if (parent.has_value()) {
    check_int64(*parent, "parent", 2);
    TORCH_CHECK(parent->size(0) == R && parent->size(1) == N,
                "parent must be [num_reqs, max_nodes] = [", R, ", ", N, "], got ", parent->sizes());
    check_same_device(nodes, *parent, "parent");
  }
  return {R, N, next.size(2), L};
}

// region_attention: dims of the region rows and the paged cache.
struct RegionDims {
  int64_t R, Q, H, Hkv, D, num_blocks, block_size, max_blocks;
};

inline bool is_attention_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

inline RegionDims check_region_attention(const at::Tensor& query, const at::Tensor& key,
                                         const at::Tensor& value, const at::Tensor& region_index,
                                         const at::Tensor& kind, const at::Tensor& step,
                                         const at::Tensor& block_idx, const at::Tensor& k_cache,
                                         const at::Tensor& v_cache, const at::Tensor& block_table,
                                         const at::Tensor& prefix_len) {
  TORCH_CHECK(query.dim() == 3, "query must be [num_tokens, H, D], got shape ", query.sizes());
  TORCH_CHECK(key.dim() == 3 && value.dim() == 3, "key and value must be [num_tokens, Hkv, D], got ",
              key.sizes(), " and ", value.sizes());
  const int64_t T = query.size(0), H = query.size(1), D = query.size(2), Hkv = key.size(1);
  TORCH_CHECK(key.size(0) == T && value.size(0) == T && key.size(2) == D && value.sizes() == key.sizes(),
              "key and value must be [num_tokens, Hkv, D] = [", T, ", Hkv, ", D, "], got ", key.sizes(),
              " and ", value.sizes());
  TORCH_CHECK(Hkv >= 1 && H % Hkv == 0, "num_heads H = ", H, " must be a multiple of num_kv_heads Hkv = ", Hkv);
  TORCH_CHECK(is_attention_float(query.scalar_type()),
              "query must be float32, bfloat16 or float16, got ", query.scalar_type());
  for (const at::Tensor* t : {&key, &value, &k_cache, &v_cache}) {
    TORCH_CHECK(t->scalar_type() == query.scalar_type(), "key, value, k_cache, v_cache must have the "
                "query's dtype ", query.scalar_type(), ", got ", t->scalar_type());
  }
  check_int64(region_index, "region_index", 2);
  const int64_t R = region_index.size(0), Q = region_index.size(1);
  check_int64(kind, "kind", 2);
  check_int64(step, "step", 2);
  check_int64(block_idx, "block_idx", 2);
  TORCH_CHECK(kind.sizes() == region_index.sizes() && step.sizes() == region_index.sizes() &&
                  block_idx.sizes() == region_index.sizes(),
              "kind, step, block_idx must be [R, Q] = ", region_index.sizes());
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(),
              "k_cache and v_cache must be [num_blocks, block_size, Hkv, D] of one shape, got ",
              k_cache.sizes(), " and ", v_cache.sizes());
  TORCH_CHECK(k_cache.size(2) == Hkv && k_cache.size(3) == D, "k_cache must be [num_blocks, block_size, ",
              Hkv, ", ", D, "], got ", k_cache.sizes());
  TORCH_CHECK(k_cache.size(1) >= 1, "k_cache block_size must be >= 1");
  check_int64(block_table, "block_table", 2);
  check_int64(prefix_len, "prefix_len", 1);
  TORCH_CHECK(block_table.size(0) == R && prefix_len.size(0) == R,
              "block_table and prefix_len must have R = ", R, " rows, got ", block_table.sizes(),
              " and ", prefix_len.sizes());
  for (const at::Tensor* t : {&key, &value, &region_index, &kind, &step, &block_idx, &k_cache,
                              &v_cache, &block_table, &prefix_len}) {
    check_same_device(query, *t, "region_attention input");
  }
  return {R, Q, H, Hkv, D, k_cache.size(0), k_cache.size(1), block_table.size(1)};
}

}  // namespace dllm_spec
