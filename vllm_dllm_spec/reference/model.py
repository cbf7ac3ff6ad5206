"""Pure-PyTorch SDAR model (Qwen3 architecture, or Qwen3-MoE for SDAR-MoE checkpoints such as
SDAR-30B-A3B): the oracle the vLLM path is tested against.

Readable over fast. The forward takes an explicit boolean attention mask and an explicit KV
cache, so every attention pattern of block diffusion (block-causal prefill, bidirectional
in-block denoising, fused commit, SimSD's reference-token mask) is just a different mask.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn


@dataclass(frozen=True)
class SDARArchConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    attention_bias: bool
    block_size: int
    mask_token_id: int | None
    eos_token_id: int | None
    # Qwen3-MoE fields (SDAR-MoE, model_type "sdar_moe"); num_experts 0 = dense (every layer an MLP)
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()

    def is_moe_layer(self, layer: int) -> bool:
        """Qwen3-MoE's rule: a sparse MoE block unless the layer is in mlp_only_layers or off
        the decoder_sparse_step grid."""
        return (self.num_experts > 0 and layer not in self.mlp_only_layers
                and (layer + 1) % self.decoder_sparse_step == 0)

    @classmethod
    def from_dict(cls, cfg: dict) -> "SDARArchConfig":
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise NotImplementedError(f"rope type {rope_type!r} is not supported (only 'default')")
        rope_theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
        eos = cfg.get("eos_token_id")
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        heads = cfg["num_attention_heads"]
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=cfg.get("num_key_value_heads", heads),
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", False)),
            block_size=int(cfg.get("block_size", 4)),
            mask_token_id=cfg.get("mask_token_id"),
            eos_token_id=eos,
            **_moe_fields(cfg),
        )


def _moe_fields(cfg: dict) -> dict:
    """Qwen3-MoE's routing fields of a config dict with experts (none for a dense config)."""
    num_experts = int(cfg.get("num_experts") or 0)
    if num_experts <= 0:
        return {}
    top_k = int(cfg["num_experts_per_tok"])
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"num_experts_per_tok must be in 1..num_experts ({num_experts}), got {top_k}")
    return {
        "num_experts": num_experts,
        "num_experts_per_tok": top_k,
        "moe_intermediate_size": int(cfg["moe_intermediate_size"]),
        "norm_topk_prob": bool(cfg.get("norm_topk_prob", False)),
        "decoder_sparse_step": int(cfg.get("decoder_sparse_step", 1)),
        "mlp_only_layers": tuple(cfg.get("mlp_only_layers") or ()),
    }


class KVCache:
    """Per-layer keys/values of the committed prefix: [batch, kv_heads, cached_len, head_dim]."""

    def __init__(self, num_layers: int):
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers

    def __len__(self) -> int:
        k = self.keys[0]
        return 0 if k is None else k.shape[2]

    def get(self, layer: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return self.keys[layer], self.values[layer]

    def truncate(self, length: int) -> None:
        """Drops the KV of every position >= length (rejected speculative blocks)."""
        self.keys = [None if k is None else k[:, :, :length] for k in self.keys]
        self.values = [None if v is None else v[:, :, :length] for v in self.values]

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        if k.shape[2] == 0:
            return
        old_k, old_v = self.keys[layer], self.values[layer]
        self.keys[layer] = k if old_k is None else torch.cat([old_k, k], dim=2)
        self.values[layer] = v if old_v is None else torch.cat([old_v, v], dim=2)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos/sin for rotate-half RoPE. positions: [batch, seq] -> [batch, 1, seq, head_dim]."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = positions.float()[..., None] * inv_freq  # [batch, seq, head_dim / 2]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos()[:, None].to(dtype), emb.sin()[:, None].to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, cfg: SDARArchConfig):
        super().__init__()
        self.cfg = cfg
        h, kvh, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, h * d, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, kvh * d, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, kvh * d, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(h * d, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache: KVCache | None, layer: int, num_store: int):
        b, t, _ = x.shape
        h, kvh, d = self.cfg.num_attention_heads, self.cfg.num_key_value_heads, self.cfg.head_dim
        q = self.q_norm(self.q_proj(x).view(b, t, h, d)).transpose(1, 2)  # [b, h, t, d]
        k = self.k_norm(self.k_proj(x).view(b, t, kvh, d)).transpose(1, 2)  # [b, kvh, t, d]
        v = self.v_proj(x).view(b, t, kvh, d).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        past_k, past_v = cache.get(layer) if cache is not None else (None, None)
        all_k = k if past_k is None else torch.cat([past_k, k], dim=2)  # [b, kvh, S, d]
        all_v = v if past_v is None else torch.cat([past_v, v], dim=2)
        if cache is not None:
            cache.append(layer, k[:, :, :num_store], v[:, :, :num_store])
        group = h // kvh
        all_k = all_k.repeat_interleave(group, dim=1)  # [b, h, S, d]
        all_v = all_v.repeat_interleave(group, dim=1)
        scores = (q @ all_k.transpose(-1, -2)).float() / math.sqrt(d)  # [b, h, t, S]
        scores = scores.masked_fill(~mask[:, None], float("-inf"))
        probs = scores.softmax(dim=-1).to(v.dtype)
        out = (probs @ all_v).transpose(1, 2).reshape(b, t, h * d)
        return self.o_proj(out)


class MLP(nn.Module):
    def __init__(self, cfg: SDARArchConfig, intermediate_size: int | None = None):
        super().__init__()
        inter = intermediate_size or cfg.intermediate_size
        self.gate_proj = nn.Linear(cfg.hidden_size, inter, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, inter, bias=False)
        self.down_proj = nn.Linear(inter, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class SparseMoeBlock(nn.Module):
    """Qwen3-MoE's sparse MLP: a router (`gate`) scores every expert, softmax over experts in
    float32, the top `num_experts_per_tok` are kept (renormalized to sum 1 when
    `norm_topk_prob`), and each token's output is the weighted sum of its chosen experts'
    SwiGLU MLPs. Names: `gate.weight`, `experts.{i}.{gate,up,down}_proj.weight`."""

    def __init__(self, cfg: SDARArchConfig):
        super().__init__()
        self.top_k, self.norm_topk_prob = cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.experts = nn.ModuleList(MLP(cfg, cfg.moe_intermediate_size) for _ in range(cfg.num_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # [N, hidden]
        probs = self.gate(flat).float().softmax(dim=-1)  # [N, E]
        weights, chosen = probs.topk(self.top_k, dim=-1)  # [N, k]
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights.to(x.dtype)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            token, slot = (chosen == e).nonzero(as_tuple=True)
            if token.numel():
                out.index_add_(0, token, expert(flat[token]) * weights[token, slot, None])
        return out.view(shape)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: SDARArchConfig, layer: int = 0):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = SparseMoeBlock(cfg) if cfg.is_moe_layer(layer) else MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class _Backbone(nn.Module):
    def __init__(self, cfg: SDARArchConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class SDARModel(nn.Module):
    """State-dict names equal HF Qwen3ForCausalLM's (model.*, lm_head.weight), or
    Qwen3MoeForCausalLM's for a config with experts."""

    def __init__(self, cfg: SDARArchConfig):
        super().__init__()
        self.config = cfg
        self.model = _Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32) -> "SDARModel":
        path = Path(path)
        cfg = SDARArchConfig.from_dict(json.loads((path / "config.json").read_text()))
        model = cls(cfg)
        state: dict[str, torch.Tensor] = {}
        index = path / "model.safetensors.index.json"
        files = (
            sorted(set(json.loads(index.read_text())["weight_map"].values()))
            if index.is_file()
            else ["model.safetensors"]
        )
        for name in files:
            state.update(load_file(str(path / name)))
        if cfg.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if cfg.tie_word_embeddings:
            missing = [m for m in missing if m != "lm_head.weight"]
        if missing or unexpected:
            raise ValueError(f"{path}: missing weights {missing}, unexpected weights {unexpected}")
        return model.to(dtype).eval()

    def forward(
        self,
        input_ids: torch.Tensor,  # [batch, seq]
        position_ids: torch.Tensor,  # [batch, seq]
        attention_mask: torch.Tensor,  # [batch, seq, cached_len + seq] bool, True = may attend
        cache: KVCache | None = None,
        num_store: int = 0,  # KV of the first num_store query tokens is appended to the cache
    ) -> torch.Tensor:  # logits [batch, seq, vocab] (float32)
        cfg = self.config
        x = self.model.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(position_ids, cfg.head_dim, cfg.rope_theta, x.dtype)
        for i, layer in enumerate(self.model.layers):
            x = x + layer.self_attn(layer.input_layernorm(x), cos, sin, attention_mask, cache, i, num_store)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.lm_head(self.model.norm(x)).float()
