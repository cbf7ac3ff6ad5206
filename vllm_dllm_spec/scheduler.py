"""Block-aware scheduler for SDAR block diffusion.

Contract with vLLM's scheduler (v1/core/sched/scheduler.py, vLLM 0.32):
- A request's tokens (`request.num_tokens`) are its prompt plus its FINISHED blocks only. The
  in-progress block's non-prompt positions travel as speculative ("draft") tokens, re-fed every
  step; so the prefix cache only ever hashes final tokens (DESIGN.md section 3 hazard).
- After every step `num_computed_tokens` is set to the start of the in-progress block, or, when
  a block just finished, to the start of that finished block: the next step then re-feeds it
  as real tokens (its exact KV commit) together with the next block's masks, block-causally, in
  ONE forward (the reference's `fuse_commit`).
- A request whose prompt completes in this step gets the masks of its first block appended as
  drafts (vLLM schedules prompt tokens only for new requests), so the prefill of the prompt's
  full blocks and the first denoising step are one forward too.
- Prompt chunks (chunked prefill) end on an SDAR block boundary, so block-causal attention of a
  later chunk sees complete blocks.
- Context limit: a step feeds at most num_speculative_tokens positions from the in-progress
  block's start and appends no sampled token after them, so the last one may sit at
  max_model_len - 1 (vLLM's cap keeps a slot free for an AR sample). A request's max_tokens is cut to what fits
  (`methods.max_total_tokens`; it ends with "length", as at vLLM's context limit); prompts
  leaving no room are refused at the front end (`vllm_hooks`).
"""
from __future__ import annotations

import time

from vllm.logger import init_logger
from vllm.v1.core.sched.scheduler import Scheduler

from vllm_dllm_spec.vllm_hooks import FIRST_STEP_KEY, ROOM_KEY

logger = init_logger("vllm." + __name__)  # under "vllm" so vLLM's log config applies
LOG_INTERVAL_S = 10.0


class BlockDiffusionScheduler(Scheduler):
    def __init__(self, vllm_config, *args, **kwargs):
        super().__init__(vllm_config, *args, **kwargs)
        hf = vllm_config.model_config.hf_config
        self.block_length = int(hf.block_size)
        self.mask_token_id = int(hf.mask_token_id)
        # Spec-token slots a block's first step feeds from its start: the method plan's
        # first_step_tokens (block diffusion: the block; SimSD: its verify region; PSD / Spiffy:
        # one block copy). A request finishing its prompt gets them less its leftover prompt
        # tokens; keep room for them.
        self.first_spec_slots = int(vllm_config.additional_config[FIRST_STEP_KEY])
        self.num_lookahead_tokens = max(self.num_lookahead_tokens, self.first_spec_slots)
        # most tokens one request can hold (computed by the config hook, which also refuses
        # prompts without room at the front end)
        self.max_total_tokens = int(vllm_config.additional_config[ROOM_KEY])
        self.num_forwards: dict[str, int] = {}  # request id -> model forwards so far
        self.step_maps: dict[str, list[int]] = {}  # request id -> step_map of its final tokens
        self.total_forwards = 0  # request-forwards of finished requests (observability)
        self.total_tokens = 0
        self._last_log = float("-inf")

    # -- admission ---------------------------------------------------------------------------
    def add_request(self, request) -> None:
        # the front end refused prompts without room (>= 1 token always fits here)
        room = self.max_total_tokens - request.num_prompt_tokens
        request.max_tokens = max(1, min(request.max_tokens, room))
        super().add_request(request)

    # -- scheduling --------------------------------------------------------------------------
    def schedule(self, *args, **kwargs):
        B = self.block_length
        cfg = self.scheduler_config
        # reserve budget for the drafts appended below (at most `first_spec_slots` per request
        # finishing a prompt: newly admitted ones and running ones still in a chunked prefill)
        prefilling = sum(1 for r in self.running if not r.spec_token_ids)
        admissible = max(self.max_num_running_reqs - len(self.running), 0)
        waiting = min(admissible, len(self.waiting) + len(self.kv_holding_waiting))
        reserve = self.first_spec_slots * (prefilling + waiting)
        reserve = min(reserve, self.max_num_scheduled_tokens // 2, cfg.max_num_batched_tokens // 2)
        saved = (self.max_num_scheduled_tokens, cfg.max_num_batched_tokens, self.max_model_len)
        self.max_num_scheduled_tokens -= reserve
        cfg.max_num_batched_tokens -= reserve
        # vLLM caps a step's input at max_model_len - 1 to leave room for the AR-sampled token;
        # a block-diffusion step samples no token past the positions it feeds
        self.max_model_len += self.num_sampled_tokens_per_step
        try:
            out = super().schedule(*args, **kwargs)
        finally:
            self.max_num_scheduled_tokens, cfg.max_num_batched_tokens, self.max_model_len = saved

        spec = out.scheduled_spec_decode_tokens
        for rid, n in list(out.num_scheduled_tokens.items()):
            req = self.requests[rid]
            self.num_forwards[rid] = self.num_forwards.get(rid, 0) + 1
            drafts = spec.get(rid)
            # vLLM pads a new request with one token left to schedule with -1 drafts (uniform
            # decode batches): those are placeholders, not a block
            padding = len(drafts) if drafts and drafts[0] < 0 else 0
            if drafts and not padding:
                continue
            if req.num_computed_tokens >= req.num_tokens:
                # the prompt completes in this step: its first step's drafts (masks) are added
                m = self.first_spec_slots - req.num_tokens % B
                spec[rid] = [self.mask_token_id] * m
                self._grow(out, req, m - padding)
            else:
                # a prompt chunk: end it on an SDAR block boundary
                end = req.num_computed_tokens
                aligned_end = end // B * B
                if end - n < aligned_end < end:
                    self._grow(out, req, aligned_end - end)
        return out

    @staticmethod
    def _grow(out, req, m: int) -> None:
        out.num_scheduled_tokens[req.request_id] += m
        out.total_num_scheduled_tokens += m
        req.num_computed_tokens += m
        req.num_in_flight_tokens += m

    # -- after the step ------------------------------------------------------------------------
    def update_from_output(self, scheduler_output, model_runner_output):
        for rid, steps in (getattr(model_runner_output, "dllm_step_maps", None) or {}).items():
            self.step_maps.setdefault(rid, []).extend(steps)
        self._step_stats = self._denoising_stats(scheduler_output, model_runner_output)
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        self._step_stats = None
        B = self.block_length
        sampled = model_runner_output.sampled_token_ids
        index = model_runner_output.req_id_to_index
        for rid in scheduler_output.scheduled_spec_decode_tokens:
            req = self.requests.get(rid)
            if req is None or req.is_finished():
                self.num_forwards.pop(rid, None)
                continue
            n_new = len(sampled[index[rid]]) if sampled and rid in index else 0
            # start of the in-progress block, or of the block that just finished (its commit)
            req.num_computed_tokens = (req.num_tokens - n_new) // B * B
        return outputs

    # -- metrics -------------------------------------------------------------------------------
    # vLLM's spec-decode stats carry the block-diffusion counts with the meaning vLLM's own
    # diffusion path gives them (v1/spec_decode/metrics.py): one "draft" = one request-forward
    # (denoising step), draft tokens = block tokens fed, accepted tokens = tokens made final.
    # So on /metrics: tokens per forward = vllm:spec_decode_num_accepted_tokens_total /
    # vllm:spec_decode_num_drafts_total (vLLM's log prints 1 + that as "Mean acceptance length").
    _step_stats = None

    def _denoising_stats(self, scheduler_output, model_runner_output):
        if not self.log_stats:
            return None
        from vllm.v1.spec_decode.metrics import SpecDecodingStats

        stats = SpecDecodingStats.new(self.num_spec_tokens)
        sampled = model_runner_output.sampled_token_ids
        index = model_runner_output.req_id_to_index
        for rid, drafts in scheduler_output.scheduled_spec_decode_tokens.items():
            n_new = len(sampled[index[rid]]) if sampled and rid in index else 0
            stats.observe_draft(num_draft_tokens=len(drafts),
                                num_accepted_tokens=min(n_new, self.num_spec_tokens))
        return stats

    def make_spec_decoding_stats(self, spec_decoding_stats, *args, **kwargs):
        return None  # replaced by _denoising_stats (vLLM's count assumes AR verification)

    def make_stats(self, spec_decoding_stats=None, *args, **kwargs):
        if spec_decoding_stats is None:
            spec_decoding_stats = self._step_stats
        return super().make_stats(spec_decoding_stats, *args, **kwargs)

    def _free_request(self, request, *args, **kwargs):
        """On finish, the request's block-diffusion record rides on the one per-request dict
        vLLM carries from the engine to the caller, `kv_transfer_params`
        (RequestOutput.kv_transfer_params offline; the response's `kv_transfer_params` field on
        the OpenAI server): {"dllm_spec": {"num_forwards", "step_map", "tokens_per_forward"}}."""
        rid = request.request_id
        forwards = self.num_forwards.pop(rid, 0)
        step_map = self.step_maps.pop(rid, [])[: request.num_output_tokens]
        kv_params, ec_params = super()._free_request(request, *args, **kwargs)
        n = request.num_output_tokens
        self.total_forwards += forwards
        self.total_tokens += n
        record = {
            "num_forwards": forwards,
            "step_map": step_map,
            "tokens_per_forward": round(n / forwards, 4) if forwards else 0.0,
        }
        kv_params = dict(kv_params or {})
        kv_params["dllm_spec"] = record
        self._maybe_log()
        return kv_params, ec_params

    def _maybe_log(self) -> None:
        now = time.monotonic()
        if now - self._last_log >= LOG_INTERVAL_S and self.total_forwards:
            self._last_log = now
            logger.info(
                "dllm_spec block diffusion: %d tokens in %d request-forwards "
                "(%.3f tokens per forward) over finished requests",
                self.total_tokens, self.total_forwards, self.total_tokens / self.total_forwards,
            )
