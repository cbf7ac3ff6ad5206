"""Tiny random replicas of the published SDAR checkpoints (JetLM/SDAR-{1.7B,4B,8B}-Chat, and
the Qwen3-MoE one, JetLM/SDAR-30B-A3B-Chat).

The published directories cannot be downloaded here, so tests run on replicas with the same
file layout and the same kinds of values, only tiny and random (docs/CHECKPOINTS.md says
which parts are confirmed from the published files and which are assumed):

- config.json: the published key set (`auto_map` to configuration_sdar / modeling_sdar,
  `torch_dtype` bfloat16, rope fields, `tie_word_embeddings`, training-only flags), with or
  without `block_size` / `mask_token_id`;
- configuration_sdar.py: a project-written minimal config class (for trust_remote_code);
- a Qwen2-style byte-level BPE tokenizer (tokenizer.json, vocab.json, merges.txt,
  tokenizer_config.json) whose added tokens are Qwen3's in Qwen3's order, then `<|MASK|>`
  (declared as `mask_token`, only added, or absent), and a Qwen3-style chat template;
- generation_config.json as Qwen3's: an eos list (`<|im_end|>`, `<|endoftext|>`) and sampling
  defaults (temperature 0.6, top_k 20, top_p 0.95);
- chat_template.jinja (the template also sits in tokenizer_config.json, as published);
- bf16 safetensors (sharded with an index for the 4B / 8B / 30B-A3B layouts), weight names 1:1
  with Qwen3's (Qwen3-MoE's for SDAR-30B-A3B-Chat: `mlp.gate.weight`,
  `mlp.experts.{i}.{gate,up,down}_proj.weight`), the vocabulary padded past the tokenizer like
  Qwen's (padding rows zero).

The MoE replica's config.json is `SDARMoeForCausalLM` / `model_type "sdar_moe"` with `auto_map`
to configuration_sdar_moe / modeling_sdar_moe and Qwen3-MoE's routing keys, and it ships a
project-written configuration_sdar_moe.py.

Entry point: `make_sdar_replica(out_dir, "SDAR-4B-Chat", diffusion_fields=False)`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from vllm_dllm_spec.checkpoint import MASK_TOKEN

# Qwen3's added tokens, in id order (151643..151668 there); `special` as in its tokenizer_config
QWEN3_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True),
    ("<|box_end|>", True), ("<|quad_start|>", True), ("<|quad_end|>", True),
    ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False),
    ("</tool_call>", False), ("<|fim_prefix|>", False), ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False), ("<|fim_pad|>", False), ("<|repo_name|>", False),
    ("<|file_sep|>", False), ("<tool_response>", False), ("</tool_response>", False),
    ("<think>", False), ("</think>", False),
)
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
MASK_MODES = ("declared", "added", "none")  # mask_token set / <|MASK|> only added / no mask token

# Qwen3-style chat template (ChatML turns; earlier assistant turns lose their <think> part;
# enable_thinking=False pre-fills an empty think block), written for the replicas.
QWEN3_STYLE_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- set content = message['content'] if message['content'] is string else '' %}"
    "{%- if message['role'] == 'assistant' and '</think>' in content %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)

# Project-written config class for trust_remote_code loads of a replica (auto_map points at it).
CONFIGURATION_SDAR_PY = '''"""SDAR configuration (vllm_dllm_spec replica; minimal: Qwen3 fields + block diffusion)."""
try:
    from transformers import PreTrainedConfig
except ImportError:  # transformers < 5
    from transformers import PretrainedConfig as PreTrainedConfig


class SDARConfig(PreTrainedConfig):
    model_type = "sdar"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(self, vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                 num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                 head_dim=128, hidden_act="silu", max_position_embeddings=32768,
                 rms_norm_eps=1e-6, rope_theta=1000000.0, rope_scaling=None,
                 attention_bias=False, tie_word_embeddings=False, block_size=None,
                 mask_token_id=None, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.rope_scaling = rope_scaling
        self.attention_bias = attention_bias
        self.block_size = block_size
        self.mask_token_id = mask_token_id
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
'''


# Project-written config class for trust_remote_code loads of the MoE replica.
CONFIGURATION_SDAR_MOE_PY = CONFIGURATION_SDAR_PY.replace(
    '"""SDAR configuration (vllm_dllm_spec replica; minimal: Qwen3 fields + block diffusion)."""',
    '"""SDAR-MoE configuration (vllm_dllm_spec replica; minimal: Qwen3-MoE fields + block diffusion)."""',
).replace("class SDARConfig(", "class SDARMoeConfig(").replace('model_type = "sdar"', 'model_type = "sdar_moe"').replace(
    "                 mask_token_id=None, **kwargs):",
    "                 mask_token_id=None, decoder_sparse_step=1, moe_intermediate_size=768,\n"
    "                 num_experts_per_tok=8, num_experts=128, norm_topk_prob=True,\n"
    "                 output_router_logits=False, router_aux_loss_coef=0.001, mlp_only_layers=None,\n"
    "                 **kwargs):\n"
    "        self.decoder_sparse_step = decoder_sparse_step\n"
    "        self.moe_intermediate_size = moe_intermediate_size\n"
    "        self.num_experts_per_tok = num_experts_per_tok\n"
    "        self.num_experts = num_experts\n"
    "        self.norm_topk_prob = norm_topk_prob\n"
    "        self.output_router_logits = output_router_logits\n"
    "        self.router_aux_loss_coef = router_aux_loss_coef\n"
    "        self.mlp_only_layers = [] if mlp_only_layers is None else mlp_only_layers",
)


@dataclass(frozen=True)
class ReplicaLayout:
    """Tiny stand-in for one published model: the published shape ratios, small sizes."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    tie_word_embeddings: bool
    num_shards: int  # the published 4B / 8B / 30B-A3B weights are sharded with an index
    # Qwen3-MoE (SDAR-30B-A3B): experts per MoE layer (0 = dense), routed per token, expert width
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0


LAYOUTS: dict[str, ReplicaLayout] = {
    # published: hidden 2048, 28 layers, 16 heads / 8 KV, head_dim 128, untied
    "SDAR-1.7B-Chat": ReplicaLayout(64, 128, 2, 4, 2, 32, False, 1),
    # published: hidden 2560, 36 layers, 32 heads / 8 KV (4:1), head_dim 128, untied (unlike Qwen3-4B)
    "SDAR-4B-Chat": ReplicaLayout(64, 160, 2, 4, 1, 32, False, 2),
    # Qwen3-8B shape: 32 heads / 8 KV (4:1), untied (assumed, see docs/CHECKPOINTS.md)
    "SDAR-8B-Chat": ReplicaLayout(96, 192, 3, 4, 1, 64, False, 2),
    # Qwen3-30B-A3B shape: 32 heads / 4 KV (8:1), untied, every layer sparse, 128 experts with
    # 8 routed per token (16:1), expert width 768 = intermediate 6144 / 8; here 8 experts, 2 routed
    "SDAR-30B-A3B-Chat": ReplicaLayout(64, 256, 2, 8, 1, 32, False, 2, num_experts=8,
                                       num_experts_per_tok=2, moe_intermediate_size=32),
}
MOE_REPLICAS = tuple(name for name, layout in LAYOUTS.items() if layout.num_experts)


def build_qwen2_tokenizer(out_dir: str | Path, *, mask: str = "declared", texts: list[str] | None = None,
                          vocab_size: int = 400):
    """A Qwen2-style tokenizer: byte-level BPE trained on `texts`, then Qwen3's added tokens in
    Qwen3's order, then `<|MASK|>` (mask: "declared" = also tokenizer_config's mask_token,
    "added" = only an added token, "none" = absent). eos is `<|im_end|>` and pad
    `<|endoftext|>` as in Qwen3 chat tokenizers. Saves the files; returns the tokenizer."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, Qwen2Tokenizer

    from vllm_dllm_spec.testing import _TOKENIZER_TEXT

    if mask not in MASK_MODES:
        raise ValueError(f"mask must be one of {MASK_MODES}, got {mask!r}")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(texts or [_TOKENIZER_TEXT] * 4, trainer)
    model = json.loads(bpe.to_str())["model"]
    vocab, merges = model["vocab"], [tuple(m) for m in model["merges"]]
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, eos_token=None, pad_token=None, unk_token=None)
    added = list(QWEN3_ADDED_TOKENS) + ([(MASK_TOKEN, True)] if mask != "none" else [])
    for content, special in added:  # one at a time: ids follow this order
        tok.add_tokens([AddedToken(content, special=special, normalized=False)], special_tokens=special)
    tok.eos_token, tok.pad_token = IM_END, ENDOFTEXT
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(out))
    _write_published_tokenizer_files(out, tok, vocab, merges, mask)
    return AutoTokenizer.from_pretrained(str(out))


def _write_published_tokenizer_files(out: Path, tok, vocab: dict, merges: list, mask: str) -> None:
    """vocab.json / merges.txt, chat_template.jinja and a tokenizer_config.json in the published
    Qwen form (added_tokens_decoder, chat_template, mask_token only when declared)."""
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out / "chat_template.jinja").write_text(QWEN3_STYLE_CHAT_TEMPLATE)
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    decoder = {
        str(tok.convert_tokens_to_ids(t.content)): {
            "content": t.content, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": t.special}
        for t in tok.added_tokens_decoder.values()
    }
    config = {
        "add_bos_token": False, "add_prefix_space": False, "added_tokens_decoder": decoder,
        "additional_special_tokens": [IM_START, IM_END], "bos_token": None,
        "chat_template": QWEN3_STYLE_CHAT_TEMPLATE, "clean_up_tokenization_spaces": False,
        "eos_token": IM_END, "errors": "replace", "model_max_length": 131072,
        "pad_token": ENDOFTEXT, "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    if mask == "declared":
        config["mask_token"] = MASK_TOKEN
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def replica_config(layout: ReplicaLayout, *, vocab_size: int, endoftext_id: int,
                   mask_token_id: int | None, block_size: int | None) -> dict:
    """config.json with the published key set; `block_size` / `mask_token_id` only when given.
    An MoE layout gets SDARMoeForCausalLM's names and Qwen3-MoE's routing keys."""
    cfg = {
        "architectures": ["SDARForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_sdar.SDARConfig",
            "AutoModel": "modeling_sdar.SDARModel",
            "AutoModelForCausalLM": "modeling_sdar.SDARForCausalLM",
        },
        "attention_bias": False, "attention_dropout": 0.0, "attn_implementation": "flex_attention",
        "bos_token_id": endoftext_id, "debug": False, "eos_token_id": endoftext_id, "ep_size": 1,
        "fuse_cross_entropy": True, "head_dim": layout.head_dim, "hidden_act": "silu",
        "hidden_size": layout.hidden_size, "initializer_range": 0.02,
        "intermediate_size": layout.intermediate_size, "max_position_embeddings": 32768,
        "max_window_layers": layout.num_hidden_layers, "micro_forward": False, "model_type": "sdar",
        "num_attention_heads": layout.num_attention_heads,
        "num_hidden_layers": layout.num_hidden_layers,
        "num_key_value_heads": layout.num_key_value_heads, "rms_norm_eps": 1e-06,
        "rope_scaling": None, "rope_theta": 1000000, "skip_checkpoint": False,
        "sliding_window": None, "tie_word_embeddings": layout.tie_word_embeddings,
        "torch_dtype": "bfloat16", "transformers_version": "4.52.4", "use_cache": False,
        "use_deepep": False, "use_sliding_window": False, "vocab_size": vocab_size,
    }
    if layout.num_experts:
        cfg.update({
            "architectures": ["SDARMoeForCausalLM"], "model_type": "sdar_moe",
            "auto_map": {
                "AutoConfig": "configuration_sdar_moe.SDARMoeConfig",
                "AutoModel": "modeling_sdar_moe.SDARMoeModel",
                "AutoModelForCausalLM": "modeling_sdar_moe.SDARMoeForCausalLM",
            },
            "decoder_sparse_step": 1, "mlp_only_layers": [],
            "moe_intermediate_size": layout.moe_intermediate_size, "norm_topk_prob": True,
            "num_experts": layout.num_experts, "num_experts_per_tok": layout.num_experts_per_tok,
            "output_router_logits": False, "router_aux_loss_coef": 0.001,
        })
    if block_size is not None:
        cfg["block_size"] = block_size
    if mask_token_id is not None:
        cfg["mask_token_id"] = mask_token_id
    return dict(sorted(cfg.items()))


def make_sdar_replica(out_dir: str | Path, name: str = "SDAR-1.7B-Chat", *, diffusion_fields: bool = False,
                      mask: str = "declared", block_size: int = 4, seed: int = 0, **shape) -> str:
    """Writes a tiny random replica of the published `name` checkpoint; returns its path.
    diffusion_fields=False leaves `block_size` / `mask_token_id` out of config.json (the
    plugin then resolves them); True writes them (block_size = `block_size`). `shape`
    overrides fields of the tiny layout (e.g. hidden_size=48), same key set otherwise."""
    import dataclasses

    from vllm_dllm_spec.testing import random_state_dict

    if name not in LAYOUTS:
        raise ValueError(f"name must be one of {sorted(LAYOUTS)}, got {name!r}")
    layout, out = dataclasses.replace(LAYOUTS[name], **shape), Path(out_dir)
    tok = build_qwen2_tokenizer(out, mask=mask)
    ids = {t: tok.convert_tokens_to_ids(t) for t in (ENDOFTEXT, IM_END)}
    mask_id = tok.convert_tokens_to_ids(MASK_TOKEN) if mask != "none" else None
    cfg = replica_config(
        layout, vocab_size=-(-len(tok) // 64) * 64, endoftext_id=ids[ENDOFTEXT],
        mask_token_id=mask_id if diffusion_fields else None,
        block_size=block_size if diffusion_fields else None)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    if layout.num_experts:
        (out / "configuration_sdar_moe.py").write_text(CONFIGURATION_SDAR_MOE_PY)
    else:
        (out / "configuration_sdar.py").write_text(CONFIGURATION_SDAR_PY)
    write_generation_config(out, [ids[IM_END], ids[ENDOFTEXT]], bos_id=ids[ENDOFTEXT])
    state = random_state_dict(cfg, seed=seed)
    _zero_padding_rows(state, len(tok))
    _write_weights(out, state, tied=layout.tie_word_embeddings, num_shards=layout.num_shards)
    return str(out)


def write_generation_config(out_dir: str | Path, eos_ids: list[int], *, bos_id: int) -> None:
    """generation_config.json as published, i.e. Qwen3's file: the eos *list* (every id ends a
    request) and Qwen3's sampling defaults, which vLLM applies to requests that leave them unset
    (with Qwen3's ids the file is 239 bytes, the size of every published SDAR copy)."""
    gen = {"bos_token_id": bos_id, "do_sample": True, "eos_token_id": list(eos_ids), "pad_token_id": bos_id,
           "temperature": 0.6, "top_k": 20, "top_p": 0.95, "transformers_version": "4.51.0"}
    (Path(out_dir) / "generation_config.json").write_text(json.dumps(gen, indent=4))


def _zero_padding_rows(state: dict[str, torch.Tensor], num_tokens: int) -> None:
    """Rows past the tokenizer (vocabulary padding) never win an argmax: zero logit, zero
    embedding, as an untrained row would be after training pushed real tokens up."""
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        if name in state:
            state[name][num_tokens:] = 0.0


def _write_weights(out: Path, state: dict[str, torch.Tensor], *, tied: bool, num_shards: int) -> None:
    tensors = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in state.items()}
    if tied:
        tensors.pop("lm_head.weight", None)
    if num_shards == 1:
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    names = list(tensors)
    weight_map: dict[str, str] = {}
    for shard in range(num_shards):
        file = f"model-{shard + 1:05d}-of-{num_shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[shard::num_shards]}
        save_file(part, str(out / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
