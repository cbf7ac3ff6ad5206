"""Config-hook side of PSD: the classes vLLM must use and the region size."""
from __future__ import annotations

from vllm_dllm_spec.methods import MethodPlan

# the block-diffusion scheduler as it is: a block's first step feeds one copy (nothing is drafted
# yet), later steps the copies the runner proposes (up to draft_depth)
SCHEDULER_CLS = "vllm_dllm_spec.scheduler.BlockDiffusionScheduler"
WORKER_CLS = "vllm_dllm_spec.psd.runner.PSDWorker"
GPU_WORKER_CLS = "vllm_dllm_spec.psd.runner.PSDGPUWorker"


class PSD:
    """PSD-style self-speculation (registered in vllm_dllm_spec.methods): the spec-token slots
    hold up to `draft_depth` copies of the in-progress block, one per drafted denoising state."""

    def plan(self, cfg, model_block: int, hf_config) -> MethodPlan:
        return MethodPlan(SCHEDULER_CLS, WORKER_CLS, cfg.draft_depth * model_block,
                          {"draft_depth": cfg.draft_depth}, GPU_WORKER_CLS, first_step_tokens=model_block)
