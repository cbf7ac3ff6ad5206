"""PSD-style self-speculative block diffusion inside vLLM (docs/PSD_VLLM.md)."""
