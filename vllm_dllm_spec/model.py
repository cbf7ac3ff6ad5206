"""vLLM `SDARForCausalLM`: Qwen3 layers (q/k RMSNorm, GQA, RoPE, tied or untied embeddings)
whose attention runs block-causally on the paged KV cache (`vllm_dllm_spec.attention`); and
`SDARMoeForCausalLM` (SDAR-30B-A3B): Qwen3-MoE layers (vLLM's `Qwen3MoeSparseMoeBlock`, fused
MoE experts) with the same block-causal attention.

Weights load through vLLM's own loader (safetensors, HF names, `AutoWeightsLoader`), exactly as
Qwen3's. The forward is Qwen3's, with no per-step logic: block structure lives in the attention
metadata builder, denoising in the runner / proposer.
"""
from __future__ import annotations

import torch
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.distributed import get_pp_group, get_tensor_model_parallel_world_size
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import QKVParallelLinear, RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
from vllm.model_executor.models.qwen2 import Qwen2MLP, Qwen2Model
from vllm.model_executor.models.qwen3 import Qwen3Attention, Qwen3DecoderLayer, Qwen3ForCausalLM
from vllm.model_executor.models.qwen3_moe import (
    Qwen3MoeDecoderLayer,
    Qwen3MoeForCausalLM,
    Qwen3MoeMLP,
    Qwen3MoeModel,
    Qwen3MoeSparseMoeBlock,
)
from vllm.model_executor.models.utils import PPMissingLayer, extract_layer_index, maybe_prefix
from vllm.platforms import current_platform
from vllm.transformers_utils.config import set_default_rope_theta


def block_attention_backend(head_size: int, cache_config=None):
    """The block-causal wrapper (`attention.create_block_causal_backend`) of the platform's
    attention backend: CPU_ATTN on CPU; on CUDA the backend vLLM selects (FLASH_ATTN or
    TRITON_ATTN; any other is refused, naming these)."""
    from vllm_dllm_spec.attention import BlockCausalCPUAttentionBackend, create_block_causal_backend

    if current_platform.is_cpu():
        return BlockCausalCPUAttentionBackend
    if not current_platform.is_cuda():
        raise NotImplementedError(
            f"vllm_dllm_spec: SDAR block-causal attention runs on the CPU and CUDA platforms, "
            f"not on {current_platform.device_name!r}")
    from vllm.v1.attention.selector import get_attn_backend

    kv_cache_dtype = cache_config.cache_dtype if cache_config is not None else "auto"
    return create_block_causal_backend(get_attn_backend(head_size, torch.get_default_dtype(), kv_cache_dtype))


class SDARAttention(Qwen3Attention):
    """Qwen3Attention with the block-causal attention backend (forward inherited)."""

    def __init__(self, config, cache_config=None, quant_config=None, prefix: str = "") -> None:
        nn.Module.__init__(self)
        tp_size = get_tensor_model_parallel_world_size()
        self.hidden_size = config.hidden_size
        self.total_num_heads = config.num_attention_heads
        if self.total_num_heads % tp_size:
            raise ValueError(
                f"num_attention_heads ({self.total_num_heads}) must be divisible by the "
                f"tensor parallel size ({tp_size})"
            )
        self.num_heads = self.total_num_heads // tp_size
        self.total_num_kv_heads = config.num_key_value_heads
        if self.total_num_kv_heads % tp_size and tp_size % self.total_num_kv_heads:
            raise ValueError(
                f"num_key_value_heads ({self.total_num_kv_heads}) and the tensor parallel size "
                f"({tp_size}) must divide one another"
            )
        self.num_kv_heads = max(1, self.total_num_kv_heads // tp_size)
        self.head_dim = getattr(config, "head_dim", None) or self.hidden_size // self.total_num_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scaling = self.head_dim**-0.5
        self.dual_chunk_attention_config = None
        self.qkv_proj = QKVParallelLinear(
            self.hidden_size, self.head_dim, self.total_num_heads, self.total_num_kv_heads,
            bias=getattr(config, "attention_bias", False), quant_config=quant_config,
            prefix=f"{prefix}.qkv_proj",
        )
        self.o_proj = RowParallelLinear(
            self.total_num_heads * self.head_dim, self.hidden_size, bias=False,
            quant_config=quant_config, prefix=f"{prefix}.o_proj",
        )
        self.rotary_emb = get_rope(
            self.head_dim, max_position=config.max_position_embeddings,
            rope_parameters=config.rope_parameters,
        )
        self.attn = Attention(
            self.num_heads, self.head_dim, self.scaling, num_kv_heads=self.num_kv_heads,
            cache_config=cache_config, quant_config=quant_config, prefix=f"{prefix}.attn",
            attn_backend=block_attention_backend(self.head_dim, cache_config),
        )
        self.q_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)


class SDARDecoderLayer(Qwen3DecoderLayer):
    """Qwen3DecoderLayer with SDARAttention (forward inherited)."""

    def __init__(self, config, cache_config=None, quant_config=None, prefix: str = "", **_) -> None:
        nn.Module.__init__(self)
        self.hidden_size = config.hidden_size
        set_default_rope_theta(config, default_theta=1000000)
        self.self_attn = SDARAttention(config, cache_config, quant_config, prefix=f"{prefix}.self_attn")
        self.mlp = Qwen2MLP(
            hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
            hidden_act=config.hidden_act, quant_config=quant_config, prefix=f"{prefix}.mlp",
        )
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)


@support_torch_compile(
    dynamic_arg_dims={"input_ids": 0, "positions": -1, "intermediate_tensors": 0, "inputs_embeds": 0}
)
class SDARModel(Qwen2Model):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix, decoder_layer_type=SDARDecoderLayer)


def _checked_sdar_config(vllm_config: VllmConfig):
    config = vllm_config.model_config.hf_config
    for attr in ("block_size", "mask_token_id"):
        if getattr(config, attr, None) is None:
            # the config hook resolves both (vllm_hooks.resolve_checkpoint_fields)
            raise ValueError(f"SDAR hf_config has no {attr!r}: was the dllm_spec config hook skipped?")
    return config


class SDARForCausalLM(Qwen3ForCausalLM):
    """SDAR block-diffusion LM (dense). Forward, logits and weight loading are Qwen3's."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        nn.Module.__init__(self)
        config = _checked_sdar_config(vllm_config)
        self.config = config
        self.vllm_config = vllm_config
        self.quant_config = vllm_config.quant_config
        self.model = SDARModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        if get_pp_group().is_last_rank:
            self.lm_head = ParallelLMHead(
                config.vocab_size, config.hidden_size, quant_config=self.quant_config,
                prefix=maybe_prefix(prefix, "lm_head"),
            )
            if config.tie_word_embeddings:
                self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        else:
            self.lm_head = PPMissingLayer()
        self.logits_processor = LogitsProcessor(config.vocab_size)
        self.make_empty_intermediate_tensors = self.model.make_empty_intermediate_tensors


# -- SDAR-MoE (SDAR-30B-A3B) ------------------------------------------------------------------

class SDARMoeDecoderLayer(Qwen3MoeDecoderLayer):
    """Qwen3MoeDecoderLayer with SDARAttention (forward inherited): a sparse MoE block
    (`Qwen3MoeSparseMoeBlock`: router softmax, top-k, norm_topk_prob, fused experts) on the
    layers Qwen3-MoE's rule picks, a dense MLP on the others."""

    def __init__(self, vllm_config: VllmConfig, prefix: str = "", **_) -> None:
        nn.Module.__init__(self)
        config = vllm_config.model_config.hf_text_config
        quant_config = vllm_config.quant_config
        self.hidden_size = config.hidden_size
        set_default_rope_theta(config, default_theta=1000000)
        self.self_attn = SDARAttention(config, vllm_config.cache_config, quant_config,
                                       prefix=f"{prefix}.self_attn")
        layer = extract_layer_index(prefix)
        sparse = (config.num_experts > 0 and layer not in (getattr(config, "mlp_only_layers", None) or [])
                  and (layer + 1) % config.decoder_sparse_step == 0)
        if sparse:
            try:
                self.mlp = Qwen3MoeSparseMoeBlock(vllm_config=vllm_config, prefix=f"{prefix}.mlp")
            except NotImplementedError as err:  # vLLM's message does not say what it refused
                raise NotImplementedError(moe_refusal_message(vllm_config, err)) from err
        else:
            self.mlp = Qwen3MoeMLP(hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
                                   hidden_act=config.hidden_act, quant_config=quant_config, prefix=f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)


def moe_refusal_message(vllm_config: VllmConfig, err: Exception) -> str:
    """Names the MoE configuration vLLM's fused-MoE kernels refused (their own error does not),
    and the CPU kernel's alignment rule where the platform is CPU."""
    config = vllm_config.model_config.hf_text_config
    tp = get_tensor_model_parallel_world_size()
    hint = ""
    if current_platform.is_cpu():
        try:
            from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts

            align = CPUUnquantizedExperts.output_alignment
            hint = (f"; vLLM's CPU MoE kernel needs hidden_size divisible by {align} (the expert width "
                    f"per rank is zero-padded to a multiple of {align})")
        except (ImportError, AttributeError):
            pass
    return (
        f"vLLM's {'CPU ' if current_platform.is_cpu() else ''}fused-MoE kernels refuse this SDAR-MoE "
        f"configuration: hidden_size={config.hidden_size}, moe_intermediate_size="
        f"{config.moe_intermediate_size} ({config.moe_intermediate_size // tp} per rank at tensor "
        f"parallel size {tp}), num_experts={config.num_experts}, num_experts_per_tok="
        f"{config.num_experts_per_tok}, dtype={vllm_config.model_config.dtype}{hint} (vLLM: {err})"
    )


@support_torch_compile(
    dynamic_arg_dims={"input_ids": 0, "positions": -1, "intermediate_tensors": 0, "inputs_embeds": 0}
)
class SDARMoeModel(Qwen3MoeModel):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix, decoder_layer_type=SDARMoeDecoderLayer)


class SDARMoeForCausalLM(Qwen3MoeForCausalLM):
    """SDAR block-diffusion LM (MoE, e.g. SDAR-30B-A3B). Forward, logits and weight loading
    (`mlp.gate.weight`, `mlp.experts.{i}.{gate,up,down}_proj.weight`) are Qwen3-MoE's."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        nn.Module.__init__(self)
        config = _checked_sdar_config(vllm_config)
        if not getattr(config, "num_experts", 0):
            raise ValueError("SDARMoeForCausalLM needs num_experts > 0 in config.json (a dense SDAR "
                             "checkpoint is SDARForCausalLM)")
        self.config = config
        self.quant_config = vllm_config.quant_config
        self.packed_modules_mapping = {**self.packed_modules_mapping}
        if getattr(config, "mlp_only_layers", None):
            self.packed_modules_mapping["gate_up_proj"] = ["gate_proj", "up_proj"]
        self.model = SDARMoeModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, quant_config=self.quant_config,
                                      prefix=maybe_prefix(prefix, "lm_head"))
        if config.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(config.vocab_size)
        self.make_empty_intermediate_tensors = self.model.make_empty_intermediate_tensors
        # the MixtureOfExperts interface's counts (expert load balancing reads them)
        sparse = [layer.mlp for layer in self.model.layers
                  if not isinstance(layer, PPMissingLayer) and isinstance(layer.mlp, Qwen3MoeSparseMoeBlock)]
        if not sparse:
            raise ValueError("SDARMoeForCausalLM: no layer has a sparse MoE block (check num_experts, "
                             "decoder_sparse_step and mlp_only_layers in config.json)")
        self.moe_layers = [block.experts for block in sparse]
        self.num_moe_layers = len(sparse)
        self.num_expert_groups = 1
        self.num_shared_experts = 0
        self.num_logical_experts = sparse[0].n_logical_experts
        self.num_physical_experts = sparse[0].n_physical_experts
        self.num_local_physical_experts = sparse[0].n_local_physical_experts
        self.num_routed_experts = sparse[0].n_routed_experts
        self.num_redundant_experts = sparse[0].n_redundant_experts
