"""SimSD inside vLLM (issue 7): a draft SDAR model proposes blocks by block diffusion, the
target verifies all requests' drafts in one batched forward with the reference-token mask.
See docs/SIMSD_VLLM.md. Entry point: `"method": "simsd"` in the `dllm_spec` option; the config
hook (`vllm_dllm_spec.vllm_hooks.configure`) routes it here through the method registry (`vllm_dllm_spec.methods`, `hooks.SimSD`)."""
