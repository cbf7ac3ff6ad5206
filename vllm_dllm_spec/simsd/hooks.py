"""Config-hook side of SimSD: validated knobs and the classes vLLM must use."""
from __future__ import annotations

import json
from pathlib import Path

from vllm_dllm_spec.methods import MethodPlan

SCHEDULER_CLS = "vllm_dllm_spec.simsd.scheduler.SimSDScheduler"
WORKER_CLS = "vllm_dllm_spec.simsd.runner.SimSDWorker"
GPU_WORKER_CLS = "vllm_dllm_spec.simsd.runner.SimSDGPUWorker"


class SimSD:
    """SimSD (registered in vllm_dllm_spec.methods): the spec-token slots hold the verify region."""

    def plan(self, cfg, model_block: int, hf_config) -> MethodPlan:
        return plan_simsd(cfg, model_block, hf_config)


def plan_simsd(cfg, model_block: int, hf_config) -> MethodPlan:
    """Validated simsd knobs and the classes vLLM must use. Raises ValueError on a bad draft
    model."""
    params = cfg.simsd_params(model_block)
    draft = cfg.draft_model
    if draft is not None:
        path = Path(draft)
        if not (path / "config.json").is_file():
            raise ValueError(f"dllm_spec.draft_model must be a local SDAR directory with a config.json, got {draft!r}")
        dcfg = json.loads((path / "config.json").read_text())
        # a draft config without mask_token_id (as published SDAR configs may be) uses the
        # target's resolved one; the runner feeds the target's mask id to both models anyway
        dcfg.setdefault("mask_token_id", hf_config.mask_token_id)
        for key in ("vocab_size", "mask_token_id"):
            if dcfg.get(key) != getattr(hf_config, key, None):
                raise ValueError(
                    f"dllm_spec.draft_model {draft!r}: {key} {dcfg.get(key)!r} differs from the "
                    f"target's {getattr(hf_config, key, None)!r} (draft and target must share the tokenizer)")
    region = 2 * params.num_draft_blocks * params.draft.block_length
    options = {
        "draft_model": draft,
        "num_draft_blocks": params.num_draft_blocks,
        "verification": params.verification,
        "rope_copy": params.rope_copy,
    }
    return MethodPlan(SCHEDULER_CLS, WORKER_CLS, region, options, GPU_WORKER_CLS)
