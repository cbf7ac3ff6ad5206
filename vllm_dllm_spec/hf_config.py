"""The `sdar` model type for transformers' AutoConfig (SDAR checkpoints load without
trust_remote_code). SDAR is Qwen3 weights plus block-diffusion fields."""
from __future__ import annotations

from transformers import AutoConfig, Qwen3Config


class SDARConfig(Qwen3Config):
    """block_size / mask_token_id stay None when config.json lacks them (published SDAR
    checkpoints may): the config hook then resolves them (vllm_dllm_spec.checkpoint)."""

    model_type = "sdar"

    def __init__(self, block_size: int | None = None, mask_token_id: int | None = None, **kwargs):
        self.block_size = block_size
        self.mask_token_id = mask_token_id
        super().__init__(**kwargs)


def register_with_transformers() -> None:
    AutoConfig.register("sdar", SDARConfig, exist_ok=True)
