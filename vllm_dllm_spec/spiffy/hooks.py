"""Config-hook side of Spiffy: the classes vLLM must use, the region size and the draft graph."""
from __future__ import annotations

from pathlib import Path

from vllm_dllm_spec.methods import MethodPlan

SCHEDULER_CLS = "vllm_dllm_spec.scheduler.BlockDiffusionScheduler"  # spec slots = the live block copies
WORKER_CLS = "vllm_dllm_spec.spiffy.runner.SpiffyWorker"
GPU_WORKER_CLS = "vllm_dllm_spec.spiffy.runner.SpiffyGPUWorker"


class Spiffy:
    """Spiffy (registered in vllm_dllm_spec.methods): the spec-token slots hold `graph_budget`
    copies of the in-progress block at most, its exact state and the open draft states of the
    graph (a block's first step: the exact state alone)."""

    def plan(self, cfg, model_block: int, hf_config) -> MethodPlan:
        from vllm_dllm_spec.reference.spiffy import default_graph_path, load_graph

        # "default" = the graph shipped next to the served checkpoint's weights
        model_dir = str(getattr(hf_config, "_name_or_path", "") or ".")
        load_graph(cfg.draft_graph, model_block, model_dir)  # a bad file is a start-up ValueError
        path = default_graph_path(model_block, model_dir) if cfg.draft_graph == "default" else Path(cfg.draft_graph)
        # every process reads the same resolved file
        return MethodPlan(SCHEDULER_CLS, WORKER_CLS, cfg.graph_budget * model_block,
                          {"draft_graph": str(path.resolve()), "graph_budget": cfg.graph_budget}, GPU_WORKER_CLS,
                          first_step_tokens=model_block)
