"""Typed, validated knobs of the dLLM methods.

One dict selects the method and its knobs, the same everywhere: `--additional-config
'{"dllm_spec": {...}}'`, `LLM(additional_config={"dllm_spec": {...}})`, and per request
`SamplingParams(extra_args={...})`. Every error names the parameter and what is allowed.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

REMASKING_STRATEGIES = (
    "sequential",
    "low_confidence_static",
    "low_confidence_dynamic",
    "entropy_bounded",
)
from vllm_dllm_spec.methods import METHOD_REGISTRY  # noqa: E402  (no vLLM / torch import)

METHODS = tuple(METHOD_REGISTRY)
VERIFICATIONS = ("greedy_match", "mrs")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass(frozen=True)
class DenoiseParams:
    """How one block is denoised: shared by the reference generator and the vLLM path."""

    block_length: int = 4
    denoising_steps: int = 4
    remasking_strategy: str = "low_confidence_dynamic"
    confidence_threshold: float = 0.85
    eb_threshold: float = 0.35

    def __post_init__(self) -> None:
        _require(
            isinstance(self.block_length, int) and self.block_length >= 1,
            f"block_length must be an integer >= 1, got {self.block_length!r}",
        )
        _require(
            isinstance(self.denoising_steps, int)
            and 1 <= self.denoising_steps <= self.block_length,
            f"denoising_steps must be an integer in [1, block_length={self.block_length}], "
            f"got {self.denoising_steps!r}",
        )
        _require(
            self.remasking_strategy in REMASKING_STRATEGIES,
            f"remasking_strategy must be one of {REMASKING_STRATEGIES}, "
            f"got {self.remasking_strategy!r}",
        )
        _require(
            isinstance(self.confidence_threshold, (int, float))
            and 0.0 <= self.confidence_threshold <= 1.0,
            f"confidence_threshold must be a number in [0, 1], got {self.confidence_threshold!r}",
        )
        _require(
            isinstance(self.eb_threshold, (int, float)) and self.eb_threshold > 0.0,
            f"eb_threshold must be a number > 0, got {self.eb_threshold!r}",
        )

    def num_transfer_tokens(self) -> list[int]:
        """Tokens to unmask at each step: block_length // steps each, the remainder one each
        to the first steps."""
        base, rest = divmod(self.block_length, self.denoising_steps)
        return [base + (1 if s < rest else 0) for s in range(self.denoising_steps)]


@dataclass(frozen=True)
class SamplingKnobs:
    """temperature == 0 is greedy; top_k 0 and top_p 1.0 switch those filters off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        _require(
            isinstance(self.temperature, (int, float)) and self.temperature >= 0.0,
            f"temperature must be a number >= 0, got {self.temperature!r}",
        )
        _require(
            isinstance(self.top_k, int) and self.top_k >= 0,
            f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}",
        )
        _require(
            isinstance(self.top_p, (int, float)) and 0.0 < self.top_p <= 1.0,
            f"top_p must be a number in (0, 1], got {self.top_p!r}",
        )


@dataclass(frozen=True)
class SimSDParams:
    """SimSD: the draft's block diffusion (`draft`) and how the target verifies it."""

    draft: DenoiseParams
    num_draft_blocks: int = 1
    verification: str = "greedy_match"  # lossless choice for greedy; "mrs" for sampling
    rope_copy: bool = True  # mask copies reuse their data token's position (paper's ablation)

    def __post_init__(self) -> None:
        _require(
            isinstance(self.num_draft_blocks, int) and self.num_draft_blocks >= 1,
            f"num_draft_blocks must be an integer >= 1, got {self.num_draft_blocks!r}",
        )
        _require(
            self.verification in VERIFICATIONS,
            f"verification must be one of {VERIFICATIONS}, got {self.verification!r}",
        )
        _require(isinstance(self.rope_copy, bool), f"rope_copy must be a bool, got {self.rope_copy!r}")


@dataclass(frozen=True)
class DLLMSpecConfig:
    """The `dllm_spec` option. Fields left out take the defaults (block_length: the model's).

    The block-diffusion knobs (denoising_steps, remasking_strategy, thresholds) describe the
    diffusion being run: the target's for "block_diffusion", the draft's for "simsd". The
    simsd-only knobs are ignored by the other methods, draft_depth by all but "psd", draft_graph
    and graph_budget by all but "spiffy".
    """

    method: str = "block_diffusion"
    block_length: int | None = None
    denoising_steps: int | None = None
    remasking_strategy: str = "low_confidence_dynamic"
    confidence_threshold: float = 0.85
    eb_threshold: float = 0.35
    # simsd
    draft_model: str | None = None  # SDAR directory of the draft; None = self-draft (the target)
    num_draft_blocks: int = 1
    verification: str = "greedy_match"
    rope_copy: bool = True
    # psd
    draft_depth: int = 3  # denoising states drafted from one forward (verified in the next)
    # spiffy
    draft_graph: str = "default"  # a calibrated draft graph's JSON path, or the one shipped with the model
    graph_budget: int = 4  # block copies per step: the exact state + up to graph_budget - 1 drafts

    def __post_init__(self) -> None:
        _require(self.method in METHODS, f"method must be one of {METHODS}, got {self.method!r}")
        _require(
            isinstance(self.draft_depth, int) and not isinstance(self.draft_depth, bool) and self.draft_depth >= 1,
            f"draft_depth must be an integer >= 1, got {self.draft_depth!r}",
        )
        _require(
            isinstance(self.graph_budget, int) and not isinstance(self.graph_budget, bool) and self.graph_budget >= 1,
            f"graph_budget must be an integer >= 1, got {self.graph_budget!r}",
        )
        _require(
            isinstance(self.draft_graph, str) and self.draft_graph != "",
            f"draft_graph must be a draft graph's JSON path or 'default', got {self.draft_graph!r}",
        )
        _require(
            self.draft_model is None or (isinstance(self.draft_model, str) and self.draft_model != ""),
            f"draft_model must be a path to an SDAR directory or null (self-draft), got {self.draft_model!r}",
        )
        # Validate the shared knobs now; without a block_length the model's block size is not
        # known yet, so steps are checked against it later (denoise_params).
        steps = self.denoising_steps
        _require(
            steps is None or (isinstance(steps, int) and steps >= 1),
            f"denoising_steps must be an integer >= 1, got {steps!r}",
        )
        self.simsd_params(self.block_length if self.block_length is not None else (steps or 1))

    @classmethod
    def from_dict(cls, options: Mapping[str, Any] | None) -> "DLLMSpecConfig":
        options = dict(options or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        _require(not unknown, f"dllm_spec: unknown option(s) {unknown}; allowed: {sorted(known)}")
        return cls(**options)

    def denoise_params(self, model_block_size: int) -> DenoiseParams:
        block_length = self.block_length if self.block_length is not None else model_block_size
        steps = self.denoising_steps if self.denoising_steps is not None else block_length
        return DenoiseParams(
            block_length=block_length,
            denoising_steps=steps,
            remasking_strategy=self.remasking_strategy,
            confidence_threshold=self.confidence_threshold,
            eb_threshold=self.eb_threshold,
        )

    def simsd_params(self, model_block_size: int) -> SimSDParams:
        return SimSDParams(
            draft=self.denoise_params(model_block_size),
            num_draft_blocks=self.num_draft_blocks,
            verification=self.verification,
            rope_copy=self.rope_copy,
        )
