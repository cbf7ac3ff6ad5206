"""The decoding methods: each is a class behind one Protocol, chosen by name from a registry.

A method tells the config hook (`vllm_hooks.configure`) which scheduler and worker classes
vLLM must use, how many speculative-token slots a request needs per step, and its own
normalized knobs. Entries are import strings, so this module (and config.py, which takes the
method names from here) loads without vLLM or torch.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, NamedTuple, Protocol

if TYPE_CHECKING:
    from vllm_dllm_spec.config import DLLMSpecConfig


class MethodPlan(NamedTuple):
    scheduler_cls: str  # import path vLLM instantiates
    worker_cls: str
    num_speculative_tokens: int  # spec-token slots a request may use in one step, counted from
    # the start of its in-progress block (its "step span", see max_total_tokens)
    options: dict  # method-specific normalized knobs, merged into additional_config["dllm_spec"]
    gpu_worker_cls: str | None = None  # the worker on CUDA (None: the method runs on CPU only)
    # spec-token slots of a block's first step (None: num_speculative_tokens); later steps take
    # what the runner proposes, up to num_speculative_tokens
    first_step_tokens: int | None = None


def max_total_tokens(max_model_len: int, block_length: int, step_span: int) -> int:
    """Most tokens (prompt + output) one request can reach. Every step of a method feeds
    `step_span` positions starting at its in-progress block's start (the padded block for block
    diffusion, the verify region for SimSD), and all of them must lie inside max_model_len; so the
    last block a request reaches must start at or before max_model_len - step_span."""
    return (max_model_len - step_span) // block_length * block_length + block_length


class DecodingMethod(Protocol):
    def plan(self, cfg: "DLLMSpecConfig", model_block: int, hf_config) -> MethodPlan:
        """Validates the method's own knobs against the model (ValueError naming the knob)."""


class BlockDiffusion:
    """Plain SDAR block diffusion: the in-progress block travels as B spec tokens."""

    def plan(self, cfg, model_block: int, hf_config) -> MethodPlan:
        return MethodPlan("vllm_dllm_spec.scheduler.BlockDiffusionScheduler",
                          "vllm_dllm_spec.worker.DLLMWorker", model_block, {},
                          "vllm_dllm_spec.worker.DLLMGPUWorker")


METHOD_REGISTRY: dict[str, str] = {
    "block_diffusion": "vllm_dllm_spec.methods:BlockDiffusion",
    "simsd": "vllm_dllm_spec.simsd.hooks:SimSD",
    "psd": "vllm_dllm_spec.psd.hooks:PSD",
    "spiffy": "vllm_dllm_spec.spiffy.hooks:Spiffy",
}


def get_method(name: str) -> DecodingMethod:
    if name not in METHOD_REGISTRY:
        raise ValueError(f"method must be one of {tuple(METHOD_REGISTRY)}, got {name!r}")
    module, cls = METHOD_REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)()
