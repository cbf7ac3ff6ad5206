"""SimSD scheduler: the block-diffusion scheduler with the verify region as spec tokens.

- A round's spec tokens are placeholders for the region `[data_k | copies_k] * K` minus the
  known tokens of the in-progress block (`runner.region_length`); the runner fills them with the
  draft's tokens before the forward. The runner's proposer output gives the next round's
  placeholders; a request whose prompt completes in this step gets them appended by the
  inherited `schedule` (`first_spec_slots` = the plan's num_speculative_tokens = the region).
- After the step (inherited): num_computed_tokens = start of the round's in-progress block, so
  the next step re-feeds every block finished since as the target's fused KV commit.
  Accepted tokens are final output at once (streaming), partial blocks included; they are
  real tokens of the request (never rewritten), so prefix caching hashes only final tokens,
  and a cache block (a multiple of B) is full only when its last SDAR block is finished.
- On finish, the request's SimSD record joins the block-diffusion record in
  kv_transfer_params["dllm_spec"].
"""
from __future__ import annotations

from collections import Counter

from vllm.logger import init_logger

from vllm_dllm_spec.scheduler import BlockDiffusionScheduler

logger = init_logger(__name__)


class SimSDScheduler(BlockDiffusionScheduler):
    def __init__(self, vllm_config, *args, **kwargs):
        super().__init__(vllm_config, *args, **kwargs)
        self.simsd_records: dict[str, dict] = {}
        self.total_target_forwards = 0
        self.total_draft_forwards = 0
        self.total_accepted = 0
        self.total_drafted = 0

    def update_from_output(self, scheduler_output, model_runner_output):
        for rid, (drafted, accepted, draft_forwards) in (
                getattr(model_runner_output, "simsd_records", None) or {}).items():
            rec = self.simsd_records.setdefault(
                rid, {"draft_forwards": 0, "drafted_per_round": [], "accepted_per_round": []})
            rec["draft_forwards"] += draft_forwards
            rec["drafted_per_round"].append(drafted)
            rec["accepted_per_round"].append(accepted)
        return super().update_from_output(scheduler_output, model_runner_output)

    def _free_request(self, request, *args, **kwargs):
        rid = request.request_id
        target_forwards = self.num_forwards.get(rid, 0)
        rec = self.simsd_records.pop(rid, None) or {
            "draft_forwards": 0, "drafted_per_round": [], "accepted_per_round": []}
        kv_params, ec_params = super()._free_request(request, *args, **kwargs)
        rec["method"] = "simsd"
        rec["target_forwards"] = target_forwards
        rec["acceptance_histogram"] = dict(sorted(Counter(rec["accepted_per_round"]).items()))
        kv_params = dict(kv_params or {})
        kv_params["dllm_spec"] = {**kv_params.get("dllm_spec", {}), **rec}
        self.total_target_forwards += target_forwards
        self.total_draft_forwards += rec["draft_forwards"]
        self.total_accepted += sum(rec["accepted_per_round"])
        self.total_drafted += sum(rec["drafted_per_round"])
        return kv_params, ec_params

    def _maybe_log(self) -> None:
        import time

        now = time.monotonic()
        if now - self._last_log >= 10.0 and self.total_target_forwards:
            self._last_log = now
            logger.info(
                "dllm_spec simsd: %d tokens, %d target forwards (%.3f tokens per target forward), "
                "%d draft forwards, acceptance %.3f over finished requests",
                self.total_tokens, self.total_target_forwards,
                self.total_tokens / self.total_target_forwards, self.total_draft_forwards,
                self.total_accepted / max(1, self.total_drafted))
