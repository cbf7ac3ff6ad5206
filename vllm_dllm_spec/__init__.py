"""vllm_dllm_spec: SDAR block-diffusion language models inside vLLM, with diffusion speculative
decoding (SimSD, PSD, Spiffy).

Importing this package is cheap: no torch, no vLLM. vLLM calls `register()` through the
`vllm.general_plugins` entry point in every process (front-end, engine core, workers).
"""
from __future__ import annotations

import os
from pathlib import Path

__version__ = "0.1.0"

_MODELS_DIR = Path(__file__).resolve().parent / "models"
_registered = False


def bundled_model_path(name: str = "target") -> str:
    """Path of a checkpoint shipped inside the package: "target" (default) or "draft"."""
    allowed = ("target", "draft")
    if name not in allowed:
        raise ValueError(f"bundled_model_path: name must be one of {allowed}, got {name!r}")
    path = _MODELS_DIR / f"sdar-tiny-{name}"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"bundled {name} checkpoint missing at {path}")
    return str(path)


def register() -> None:
    """vLLM plugin entry point. Lazy and idempotent: safe to call any number of times."""
    global _registered
    if _registered:
        return
    from vllm_dllm_spec.hf_config import register_with_transformers

    register_with_transformers()
    if os.environ.get("DLLM_SPEC_DISABLE_VLLM_HOOKS") != "1":
        from vllm_dllm_spec import vllm_hooks

        vllm_hooks.install()
    _registered = True
