"""Worker and model-runner subclasses for SDAR block diffusion (CPU and CUDA platforms).

The runner logic shared by every method is one mixin, `DLLMRunnerMixin`, over vLLM's V1 runner of
each platform; plain block diffusion adds `DenoiseRunnerMixin`: `DLLMModelRunner` (CPU, over
`CPUModelRunner`) and `DLLMGPUModelRunner` (CUDA, over `GPUModelRunner`; custom_class speculation
keeps vLLM on its V1 runner). Workers: `DLLMWorker` (CPU) and `DLLMGPUWorker` (CUDA); a method's
worker names its runner in `runner_cls`. The runner keeps vLLM's input preparation, forward and
bookkeeping. It replaces only:
- `_calc_spec_decode_metadata`: logits rows only AT the drafts that are masks (SDAR predicts a
  masked position from its own logits: no AR shift, and a step only unmasks masks), instead of
  vLLM's rows before every draft plus a bonus row per request.
- `_sample`: instead of the AR sampler / rejection sampler, one denoising step of every
  in-progress block from those rows. A finished block is returned as the step's sampled tokens
  (all of its generated tokens at once); an unfinished one returns none.
- `propose_draft_token_ids`: the drafts of the next step are the updated blocks (or the next
  block's masks), computed by `_sample`; no extra forward.
"""
from __future__ import annotations

import numpy as np
import torch
from vllm.utils.torch_utils import async_tensor_h2d
from vllm.v1.outputs import SamplerOutput
from vllm.v1.spec_decode.metadata import SpecDecodeMetadata
from vllm.v1.worker.cpu_model_runner import CPUModelRunner
from vllm.v1.worker.cpu_worker import CPUWorker
from vllm.v1.worker.gpu_model_runner import GPUModelRunner
from vllm.v1.worker.gpu_worker import Worker

from vllm_dllm_spec.denoise import PLACEHOLDER, BlockDiffusionProposer
from vllm_dllm_spec.logprobs import step_logprobs
from vllm_dllm_spec.vllm_hooks import VALIDATOR_CLS


def draft_indices(num_draft_tokens: np.ndarray, cu_num_scheduled_tokens: np.ndarray) -> np.ndarray:
    """The flat token index of every draft [T]: the last num_draft_tokens of each request's
    scheduled tokens (num_draft_tokens, cu_num_scheduled_tokens [num_reqs])."""
    starts = np.cumsum(num_draft_tokens) - num_draft_tokens  # [R]
    return (np.repeat(cu_num_scheduled_tokens - num_draft_tokens - starts, num_draft_tokens)
            + np.arange(int(num_draft_tokens.sum())))


def read_rows_metadata(runner, num_draft_tokens: np.ndarray, draft_index: np.ndarray,
                       logits_index: np.ndarray, rows_per_request: np.ndarray) -> SpecDecodeMetadata:
    """vLLM's spec-decode metadata with logits rows only at `logits_index` [M] (flat token
    indices, in the order `_sample` reads them; rows_per_request [num_reqs] of them each):
    the LM head, the row gather and the [rows, V] reductions skip every row the method never
    reads, and vLLM's AR target / bonus rows (their index tensors are empty). draft_index [T]:
    the flat token of every draft (its ids come from the step's input ids)."""
    dev = runner.device
    empty = torch.zeros(0, dtype=torch.int32, device=dev)
    return SpecDecodeMetadata(
        draft_token_ids=runner.input_ids.gpu[async_tensor_h2d(draft_index, device=dev)],  # [T]
        num_draft_tokens=num_draft_tokens.tolist(),
        cu_num_draft_tokens=async_tensor_h2d(np.cumsum(num_draft_tokens, dtype=np.int32), device=dev),
        cu_num_sampled_tokens=async_tensor_h2d(np.cumsum(rows_per_request, dtype=np.int32), device=dev),
        target_logits_indices=empty,
        bonus_logits_indices=empty,
        logits_indices=async_tensor_h2d(logits_index, device=dev),  # [M]
    )


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

    def _input_fits_in_drafter(self, common_attn_metadata) -> bool:
        # vLLM zeroes the drafts when a drafter model would run past max_model_len; ours is no
        # model (the drafts are the blocks themselves), so they are always valid
        return common_attn_metadata is not None


class DenoiseRunnerMixin:
    """Plain block diffusion's logits rows and denoising step; mixed in before `DLLMRunnerMixin`
    (the speculative methods verify other rows and bring their own `_sample`)."""

    drafter: BlockDiffusionProposer

    def _calc_spec_decode_metadata(self, num_draft_tokens: np.ndarray,
                                   cu_num_scheduled_tokens: np.ndarray) -> SpecDecodeMetadata:
        """vLLM's metadata with the logits rows of the drafts that are masks only: the LM head, the
        row gather and the [rows, V] reductions of the step skip the unmasked drafts and vLLM's AR
        target / bonus rows, which denoising never reads (it has none of those: target and bonus
        indices are empty)."""
        draft_index = draft_indices(num_draft_tokens, cu_num_scheduled_tokens)  # [T]
        # the step's input ids are on the host here (vLLM gathers them there before its copy)
        is_mask = self.input_ids.np[draft_index] == self.drafter.mask_token_id  # [T]
        if not is_mask.any():  # prompt chunks only: nothing to denoise, the LM head wants a row
            return super()._calc_spec_decode_metadata(num_draft_tokens, cu_num_scheduled_tokens)
        masks = np.bincount(np.repeat(np.arange(len(num_draft_tokens)), num_draft_tokens)[is_mask],
                            minlength=len(num_draft_tokens))  # [R] mask rows per request
        return read_rows_metadata(self, num_draft_tokens, draft_index, draft_index[is_mask], masks)

    def _sample(self, logits, spec_decode_metadata) -> SamplerOutput:
        batch = self.input_batch
        num_reqs = batch.num_reqs
        req_ids = batch.req_ids[:num_reqs]
        B = self.drafter.block_length
        if spec_decode_metadata is None:  # only prompt chunks in this step: nothing to denoise
            num_drafts = [0] * num_reqs
            draft_ids = torch.zeros(0, dtype=torch.int64)
        else:
            num_drafts = spec_decode_metadata.num_draft_tokens
            draft_ids = spec_decode_metadata.draft_token_ids
        params = [self.requests[r].sampling_params for r in req_ids]
        # `logits` [M, V]: rows at the mask drafts (_calc_spec_decode_metadata), denoise edits them
        finished = self.drafter.denoise(
            req_ids, params, batch.num_tokens_no_spec[:num_reqs].tolist(), list(num_drafts), draft_ids,
            logits, batch.generators,
        )  # [num_reqs, B]
        # one spare column keeps vLLM on its multi-token (rejection-sampler) output path; the
        # result lives where vLLM's own sampler would put it (the logits' device)
        sampled = torch.full((num_reqs, B + 1), PLACEHOLDER, dtype=torch.int32)  # [num_reqs, B + 1]
        sampled[:, :B] = finished
        grid = step_logprobs(params, self.drafter.vocab_size, B + 1)
        if grid is not None:  # a finished block's tokens sit in its last columns (denoise's `out`)
            for row, (ids, values, ranks) in self.drafter.finished_logprobs.items():
                grid.put(row, slice(B - ids.shape[0], B), ids, values, ranks)
        return SamplerOutput(sampled_token_ids=sampled.to(logits.device),
                             logprobs_tensors=None if grid is None else grid.tensors())

    def propose_draft_token_ids(self, scheduler_output, sampled_token_ids, *args, **kwargs):
        return self.drafter.propose(sampled_token_ids)


class DLLMModelRunner(DenoiseRunnerMixin, DLLMRunnerMixin, CPUModelRunner):
    pass


class DLLMGPUModelRunner(DenoiseRunnerMixin, DLLMRunnerMixin, GPUModelRunner):
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
