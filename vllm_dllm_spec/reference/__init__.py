"""The pure-PyTorch oracle: SDAR model and block-diffusion generation (SimSD: `reference.simsd`,
PSD-style self-speculation: `reference.psd`, Spiffy over calibrated draft graphs:
`reference.spiffy`)."""
from vllm_dllm_spec.reference.generate import GenerateOutput, block_causal_mask, generate
from vllm_dllm_spec.reference.model import KVCache, SDARArchConfig, SDARModel

__all__ = ["GenerateOutput", "KVCache", "SDARArchConfig", "SDARModel", "block_causal_mask", "generate"]
