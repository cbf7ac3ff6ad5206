"""Where an SDAR checkpoint keeps its diffusion fields, and how the plugin resolves them.

Published SDAR checkpoints (JetLM/SDAR-*-Chat) do not all carry `block_size` and
`mask_token_id` in config.json: SDAR's own generation script takes the mask id from the
tokenizer's mask token and the block length from a command-line argument (default 4), and
its stop ids from generation_config.json (docs/CHECKPOINTS.md). The rules here follow that:

- block size: config.json `block_size`, else the `block_length` knob of
  `additional_config["dllm_spec"]`, else `DEFAULT_BLOCK_SIZE` (the caller logs that once);
- mask token id: config.json `mask_token_id`, else the tokenizer's mask token (its
  `mask_token`, else `<|MASK|>`, else the one added token named like a mask), else a
  ValueError naming both places;
- stop ids: every id of generation_config.json's `eos_token_id` (an int or a list).

Pure functions (no vLLM, no torch), so the rules are unit-testable on their own.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

DEFAULT_BLOCK_SIZE = 4  # SDAR's generate.py default and the block the published models were trained with
MASK_TOKEN = "<|MASK|>"  # the mask token of the published SDAR tokenizers (id 151669)
# "<|mask|>", "<mask>", "<|mdm_mask|>", "[MASK]": names other diffusion tokenizers use
_MASK_NAME = re.compile(r"^[<\[]\|?\s*(mdm_)?mask\s*\|?[>\]]$", re.IGNORECASE)


@dataclass(frozen=True)
class Resolved:
    """A resolved value and where it came from (for log lines and error messages)."""

    value: int
    source: str


def _as_token_id(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{what} must be a non-negative integer token id, got {value!r}")
    return value


def resolve_block_size(config_value: Any, knob: int | None) -> Resolved:
    """The SDAR block size: config.json's `block_size`, else the `block_length` knob, else the
    default. A knob that contradicts the config is refused by the caller (it knows the knob's
    name in context); here the config simply wins."""
    if config_value is not None:
        if isinstance(config_value, bool) or not isinstance(config_value, int) or config_value < 1:
            raise ValueError(f"config.json block_size must be an integer >= 1, got {config_value!r}")
        return Resolved(config_value, "config.json block_size")
    if knob is not None:
        return Resolved(knob, "dllm_spec.block_length")
    return Resolved(DEFAULT_BLOCK_SIZE, "default")


def tokenizer_mask_token_id(tokenizer: Any) -> Resolved | None:
    """The tokenizer's mask token id, or None when it has none. Looks at `mask_token` (what
    SDAR's generate.py reads), then `<|MASK|>`, then an added token named like a mask; two
    different mask-like added tokens are ambiguous and refused."""
    token = getattr(tokenizer, "mask_token", None)
    if token:
        return Resolved(_token_id(tokenizer, token), f"tokenizer mask_token {token!r}")
    vocab = _added_vocab(tokenizer)
    if MASK_TOKEN in vocab:
        return Resolved(vocab[MASK_TOKEN], f"tokenizer token {MASK_TOKEN!r}")
    named = sorted(name for name in vocab if _MASK_NAME.match(name))
    if len(named) > 1:
        raise ValueError(f"the tokenizer has several mask-like tokens {named}; set mask_token_id "
                         "in config.json to choose one")
    if named:
        return Resolved(vocab[named[0]], f"tokenizer token {named[0]!r}")
    return None


def resolve_mask_token_id(config_value: Any, tokenizer: Any, vocab_size: int) -> Resolved:
    """The mask token id: config.json's `mask_token_id`, else the tokenizer's mask token.
    Raises ValueError naming both places when neither has one (tokenizer may be None when it
    could not be loaded)."""
    if config_value is not None:
        found = Resolved(_as_token_id(config_value, "config.json mask_token_id"), "config.json mask_token_id")
    else:
        found = tokenizer_mask_token_id(tokenizer) if tokenizer is not None else None
    if found is None:
        raise ValueError(
            "SDAR needs a mask token id and found none: config.json has no mask_token_id and the "
            f"tokenizer has no mask token (no mask_token, no {MASK_TOKEN!r}, no added token named "
            "like a mask); set mask_token_id in config.json or mask_token in tokenizer_config.json")
    if found.value >= vocab_size:
        raise ValueError(f"mask token id {found.value} ({found.source}) is outside the model's "
                         f"vocabulary (vocab_size {vocab_size})")
    return found


def eos_token_ids(generation_config: Mapping[str, Any] | None) -> list[int]:
    """generation_config.json's `eos_token_id` as a list (it may be an int or a list)."""
    value = (generation_config or {}).get("eos_token_id")
    if value is None:
        return []
    values = [value] if isinstance(value, int) else list(value)
    return [_as_token_id(v, "generation_config.json eos_token_id") for v in values]


def _added_vocab(tokenizer: Any) -> dict[str, int]:
    getter = getattr(tokenizer, "get_added_vocab", None)
    return dict(getter()) if callable(getter) else {}


def _token_id(tokenizer: Any, token: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    unknown = getattr(tokenizer, "unk_token_id", None)
    if token_id is None or (token_id == unknown and token != getattr(tokenizer, "unk_token", None)):
        raise ValueError(f"the tokenizer's mask_token {token!r} is not in its vocabulary")
    return int(token_id)
