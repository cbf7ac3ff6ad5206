"""Per-phase time of an engine step, for an in-process `LLM` (VLLM_ENABLE_V1_MULTIPROCESSING=0).

`PhaseProfiler(llm)` wraps, on the live engine's INSTANCES (no class is patched, nothing is left
behind after `detach()`), the calls that make up one step and books each call's EXCLUSIVE time
(its own time minus the wrapped calls nested in it) to a phase:

  engine         EngineCore.step_fn: the engine loop around everything else
  scheduler      Scheduler.schedule / update_from_output
  runner         runner.execute_model / sample_tokens: input preparation and the runner's Python
  draft          SimSD's draft round (_draft_step), PSD / Spiffy drafting (_draft_chain)
  acceptance     runner._sample: denoising / verification / acceptance of the step's logits
  target_rest    the target model's forward outside attention (embeddings, MLPs, norms, head)
  attention      the attention kernel of every layer (the block-causal backend)
  region_attn    the verify-region fix-up around the kernel (SimSD / PSD / Spiffy)

Exclusive times add up to the wall time of the engine core's steps, so a stacked bar is the step
(the front end's output processing, outside the engine core, is not in it).
"""
from __future__ import annotations

import functools
import time
from collections import defaultdict

_ABSENT = object()
PHASES = ("engine", "scheduler", "runner", "draft", "acceptance", "target_rest", "attention", "region_attn")


class _BaseImplProxy:
    """Stands in for a region impl's `_base_impl` (looked up on the instance first) so the base
    kernel's forward is timed as `attention` inside `region_attn`."""

    def __init__(self, profiler: "PhaseProfiler", base: type):
        self._forward = profiler._timed("attention", base.forward)

    def forward(self, *args, **kwargs):
        return self._forward(*args, **kwargs)


class PhaseProfiler:
    def __init__(self, llm):
        core = llm.llm_engine.engine_core.engine_core
        runner = core.model_executor.driver_worker.worker.model_runner
        self.totals: dict[str, float] = defaultdict(float)
        self.steps = 0
        self._stack: list[list[float]] = []  # per open call: [time spent in nested wrapped calls]
        self._patched: list[tuple[object, str, object]] = []  # (object, attribute, its own old value)
        self._patch(core, "step_fn", "engine")
        for name in ("schedule", "update_from_output"):
            self._patch(core.scheduler, name, "scheduler")
        self._patch(runner, "execute_model", "runner", count_steps=True)
        self._patch(runner, "sample_tokens", "runner")
        self._patch(runner, "propose_draft_token_ids", "runner")  # hands the next step's spec slots over
        for name in ("_draft_step", "_draft_chain"):
            if hasattr(runner, name):
                self._patch(runner, name, "draft")
        self._patch(runner, "_sample", "acceptance")
        self._patch(runner.model, "forward", "target_rest")
        from vllm.model_executor.layers.attention import Attention

        for module in runner.model.modules():
            if isinstance(module, Attention):
                base = getattr(type(module.impl), "_base_impl", None)
                self._patch(module.impl, "forward", "region_attn" if base is not None else "attention")
                if base is not None:
                    self._patched.append((module.impl, "_base_impl", vars(module.impl).get("_base_impl", _ABSENT)))
                    module.impl._base_impl = _BaseImplProxy(self, base)

    def _timed(self, phase: str, fn, count_steps: bool = False):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            self._stack.append([0.0])
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - start
                nested = self._stack.pop()[0]
                self.totals[phase] += elapsed - nested
                if self._stack:
                    self._stack[-1][0] += elapsed
                if count_steps:
                    self.steps += 1
        return wrapper

    def _patch(self, obj, name: str, phase: str, count_steps: bool = False) -> None:
        self._patched.append((obj, name, vars(obj).get(name, _ABSENT)))
        setattr(obj, name, self._timed(phase, getattr(obj, name), count_steps))

    def reset(self) -> None:
        self.totals.clear()
        self.steps = 0

    def per_step_ms(self) -> dict[str, float]:
        """Mean exclusive milliseconds per executed step, per phase (0 for phases not seen)."""
        steps = max(1, self.steps)
        return {phase: 1000 * self.totals.get(phase, 0.0) / steps for phase in PHASES}

    def detach(self) -> None:
        for obj, name, old in reversed(self._patched):
            if old is _ABSENT:
                delattr(obj, name)  # the class's method shows through again
            else:
                setattr(obj, name, old)  # e.g. EngineCore.step_fn, an instance attribute of its own
        self._patched.clear()
