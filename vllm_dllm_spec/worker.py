"""Worker and model-runner subclasses for SDAR block diffusion (CPU and CUDA platforms).

The runner logic is one mixin, `DLLMRunnerMixin`, over vLLM's V1 runner of each platform:
`DLLMModelRunner` (CPU, over `CPUModelRunner`) and `DLLMGPUModelRunner` (CUDA, over
`GPUModelRunner`; custom_class speculation keeps vLLM on its V1 runner). Workers:
`DLLMWorker` (CPU) and `DLLMGPUWorker` (CUDA); a method's worker names its runner in
`runner_cls`. The runner keeps vLLM's input preparation, forward and bookkeeping. It replaces only:
- `_sample`: instead of the AR sampler / rejection sampler, one denoising step of every
  in-progress block, from the logits AT the draft positions (SDAR predicts a masked position
  from its own logits: no AR shift). A finished block is returned as the step's sampled tokens
  (all of its generated tokens at once); an unfinished one returns none.
- `propose_draft_token_ids`: the drafts of the next step are the updated blocks (or the next
  block's masks), computed by `_sample`; no extra forward.
"""
from __future__ import annotations

import torch
from vllm.v1.outputs import SamplerOutput
from vllm.v1.worker.cpu_model_runner import CPUModelRunner
from vllm.v1.worker.cpu_worker import CPUWorker
from vllm.v1.worker.gpu_model_runner import GPUModelRunner
from vllm.v1.worker.gpu_worker import Worker

from vllm_dllm_spec.denoise import PLACEHOLDER, BlockDiffusionProposer
from vllm_dllm_spec.logprobs import step_logprobs
from vllm_dllm_spec.vllm_hooks import VALIDATOR_CLS


class DLLMRunnerMixin:
    """Block diffusion's runner hooks; mixed in before a vLLM runner class (CPU or GPU)."""

    drafter: BlockDiffusionProposer

    def __init__(self, vllm_config, device):
        # The request-knob validator is a front-end-only logits processor (its validate_params
        # runs at admission); vLLM refuses custom logits processors in a speculative runner, and
        # block diffusion does not use vLLM's sampler anyway, so the runner is built without it.
        model_config = vllm_config.model_config
        saved = model_config.logits_processors
        model_config.logits_processors = [p for p in saved or [] if p != VALIDATOR_CLS] or None
        try:
            super().__init__(vllm_config, device)
        finally:
            model_config.logits_processors = saved

    def _update_states(self, scheduler_output):
        self.drafter.drop(scheduler_output.finished_req_ids)
        self.drafter.restart_blocks(scheduler_output.preempted_req_ids or ())
        return super()._update_states(scheduler_output)

    def sample_tokens(self, grammar_output):
        output = super().sample_tokens(grammar_output)
        # step_map of every block finished in this step travels to the scheduler with the
        # output (a plain attribute: ModelRunnerOutput is a dataclass, pickled across processes)
        if hasattr(output, "req_ids"):
            output.dllm_step_maps = self.drafter.finished_step_maps
        return output

    def _sample(self, logits, spec_decode_metadata) -> SamplerOutput:
        batch = self.input_batch
        num_reqs = batch.num_reqs
        req_ids = batch.req_ids[:num_reqs]
        B = self.drafter.block_length
        if spec_decode_metadata is None:  # only prompt chunks in this step: nothing to denoise
            num_drafts = [0] * num_reqs
            draft_ids = torch.zeros(0, dtype=torch.int64)
            draft_logits = logits[:0]
        else:
            num_drafts = spec_decode_metadata.num_draft_tokens
            draft_ids = spec_decode_metadata.draft_token_ids
            # rows of `logits` at the draft tokens themselves (target rows + 1)
            draft_logits = logits[spec_decode_metadata.target_logits_indices + 1]  # [T, V]
        finished = self.drafter.denoise(
            req_ids,
            [self.requests[r].sampling_params for r in req_ids],
            batch.num_tokens_no_spec[:num_reqs].tolist(),
            list(num_drafts),
            draft_ids,
            draft_logits,
            batch.generators,
        )  # [num_reqs, B]
        # one spare column keeps vLLM on its multi-token (rejection-sampler) output path; the
        # result lives where vLLM's own sampler would put it (the logits' device)
        pad = torch.full((num_reqs, 1), PLACEHOLDER, dtype=finished.dtype)
        sampled = torch.cat([finished, pad], dim=1).to(logits.device, torch.int32)  # [num_reqs, B + 1]
        assert sampled.shape[1] == B + 1
        grid = step_logprobs([self.requests[r].sampling_params for r in req_ids], self.drafter.vocab_size, B + 1)
        if grid is not None:  # a finished block's tokens sit in its last columns (denoise's `out`)
            for row, (ids, values, ranks) in self.drafter.finished_logprobs.items():
                grid.put(row, slice(B - ids.shape[0], B), ids, values, ranks)
        return SamplerOutput(sampled_token_ids=sampled,
                             logprobs_tensors=None if grid is None else grid.tensors())

    def _input_fits_in_drafter(self, common_attn_metadata) -> bool:
        # vLLM zeroes the drafts when a drafter model would run past max_model_len; ours is no
        # model (the drafts are the blocks themselves), so they are always valid
        return common_attn_metadata is not None

    def propose_draft_token_ids(self, scheduler_output, sampled_token_ids, *args, **kwargs):
        return self.drafter.propose(sampled_token_ids)


class DLLMModelRunner(DLLMRunnerMixin, CPUModelRunner):
    pass


class DLLMGPUModelRunner(DLLMRunnerMixin, GPUModelRunner):
    pass


class DLLMWorker(CPUWorker):
    runner_cls = DLLMModelRunner  # a method's worker subclass names its runner here

    def init_device(self):
        # CPUWorker.init_device builds a CPUModelRunner as its last step; build ours instead
        # (the base runner is constructed without the front-end-only validator too).
        model_config = self.vllm_config.model_config
        saved = model_config.logits_processors
        model_config.logits_processors = [p for p in saved or [] if p != VALIDATOR_CLS] or None
        try:
            super().init_device()
        finally:
            model_config.logits_processors = saved
        self.model_runner = self.runner_cls(self.vllm_config, torch.device("cpu"))


class DLLMGPUWorker(Worker):
    runner_cls = DLLMGPUModelRunner  # a method's GPU worker subclass names its runner here

    def _make_model_runner(self):
        # vLLM's V1 GPU worker builds its runner here (custom_class speculation forces V1); the
        # runner's own __init__ leaves out the front-end-only validator
        return self.runner_cls(self.vllm_config, self.device)
