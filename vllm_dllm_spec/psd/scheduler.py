"""PSD scheduler: the block-diffusion scheduler with `draft_depth` block copies as spec tokens.

Every step of a PSD request feeds its region (`draft_depth` x B tokens from the in-progress
block's start, minus the block's known prompt tokens, which are real tokens); the runner fills
it. Everything else (block-aligned prompt chunks, the rollback that fuses a finished block's
commit into the next step, records) is the inherited block-diffusion schedule.
"""
from __future__ import annotations

from vllm_dllm_spec.scheduler import BlockDiffusionScheduler


class PSDScheduler(BlockDiffusionScheduler):
    def __init__(self, vllm_config, *args, **kwargs):
        super().__init__(vllm_config, *args, **kwargs)
        options = (vllm_config.additional_config or {}).get("dllm_spec") or {}
        self.first_spec_slots = int(options["draft_depth"]) * self.block_length
        self.num_lookahead_tokens = max(self.num_lookahead_tokens, self.first_spec_slots)
