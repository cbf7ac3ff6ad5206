// Operator schemas of the dllm_spec library and the Python module stub of vllm_dllm_spec._C.
// Implementations: csrc/cpu/ops_cpu.cpp (always built), csrc/cuda/ops_cuda.cu (nvcc + CUDA torch).
// Contracts: docs/CONTRACTS.md, section "csrc operators".
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import vllm_dllm_spec._C` only has to load the shared library: loading runs the static
// TORCH_LIBRARY registrations below. No Python symbols are exported.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "dllm_spec operators (torch.ops.dllm_spec)", -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(dllm_spec, m) {
  // query_start_loc [num_reqs + 1], kind/step/block_idx [num_tokens] (all int64)
  // -> bool [num_tokens, max_q]
  m.def("ref_token_mask(Tensor query_start_loc, Tensor kind, Tensor step, Tensor block_idx, "
        "int max_q) -> Tensor");
  // draft [num_reqs, max_k], num_draft [num_reqs], target [num_reqs, max_k + 1],
  // num_target [num_reqs] (int64) -> (accepted [num_reqs], next_token [num_reqs])
  m.def("greedy_match(Tensor draft_token_ids, Tensor num_draft, Tensor target_token_ids, "
        "Tensor num_target) -> (Tensor, Tensor)");
  // + draft_probs [num_reqs, max_k, V], target_probs [num_reqs, max_k + 1, V],
  //   uniform_accept [num_reqs, max_k], uniform_recover [num_reqs] (float32 or float64)
  m.def("rejection_sample(Tensor draft_token_ids, Tensor num_draft, Tensor draft_probs, "
        "Tensor target_probs, Tensor num_target, Tensor uniform_accept, "
        "Tensor uniform_recover) -> (Tensor, Tensor)");
  // base [num_reqs, L], node_tokens [num_reqs, max_nodes, L], parent [num_reqs, max_nodes],
  // num_nodes [num_reqs], verify [num_reqs, L] (int64)
  // -> (node [num_reqs], depth [num_reqs], num_new_tokens [num_reqs])
  m.def("hierarchical_accept(Tensor base_tokens, Tensor node_tokens, Tensor parent, "
        "Tensor num_nodes, Tensor verify_tokens, int mask_id) -> (Tensor, Tensor, Tensor)");
  // node_states [num_reqs, N, L], next_states [num_reqs, N + 1, D, L], num_nodes [num_reqs],
  // parent [num_reqs, N] or None (int64) -> (path_len [num_reqs], path [num_reqs, D])
  m.def("graph_accept(Tensor node_states, Tensor next_states, Tensor num_nodes, Tensor? parent) "
        "-> (Tensor, Tensor)");
  // query [T, H, D], key/value [T, Hkv, D], region_index/kind/step/block_idx [R, Q] (int64),
  // k_cache/v_cache [num_blocks, block_size, Hkv, D] (strided views of the paged cache),
  // block_table [R, max_blocks], prefix_len [R] (int64) -> [R, Q, H, D] in query's dtype
  m.def("region_attention(Tensor query, Tensor key, Tensor value, Tensor region_index, "
        "Tensor kind, Tensor step, Tensor block_idx, Tensor k_cache, Tensor v_cache, "
        "Tensor block_table, Tensor prefix_len, float scale) -> Tensor");
}
