"""The `sdar` and `sdar_moe` model types for transformers' AutoConfig (SDAR checkpoints load
without trust_remote_code). SDAR is Qwen3 weights plus block-diffusion fields; SDAR-MoE
(SDAR-30B-A3B) is Qwen3-MoE weights plus the same fields."""
from __future__ import annotations

from transformers import AutoConfig, Qwen3Config, Qwen3MoeConfig


class SDARConfig(Qwen3Config):
    """block_size / mask_token_id stay None when config.json lacks them (published SDAR
    checkpoints may): the config hook then resolves them (vllm_dllm_spec.checkpoint)."""

    model_type = "sdar"

    def __init__(self, block_size: int | None = None, mask_token_id: int | None = None, **kwargs):
        self.block_size = block_size
        self.mask_token_id = mask_token_id
        super().__init__(**kwargs)


class SDARMoeConfig(Qwen3MoeConfig):
    """SDAR-MoE (`SDARMoeForCausalLM`): Qwen3-MoE's fields (num_experts, num_experts_per_tok,
    moe_intermediate_size, norm_topk_prob, decoder_sparse_step, mlp_only_layers) plus
    block_size / mask_token_id, resolved by the config hook like SDARConfig's."""

    model_type = "sdar_moe"

    def __init__(self, block_size: int | None = None, mask_token_id: int | None = None, **kwargs):
        self.block_size = block_size
        self.mask_token_id = mask_token_id
        super().__init__(**kwargs)


CONFIG_CLASSES = {"sdar": SDARConfig, "sdar_moe": SDARMoeConfig}


def register_with_transformers() -> None:
    for model_type, cls in CONFIG_CLASSES.items():
        AutoConfig.register(model_type, cls, exist_ok=True)
