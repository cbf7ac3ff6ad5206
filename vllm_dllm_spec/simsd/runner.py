"""SimSD worker / model runner: `SimSDRunnerMixin` over the block-diffusion mixin, mixed into a CPU
runner (`SimSDModelRunner`) and a GPU one (`SimSDGPUModelRunner`; see vllm_dllm_spec.worker).

One engine step of a SimSD request = one SimSD round (reference `reference.simsd`):
1. `_update_states` (after vLLM's bookkeeping): the DRAFT runs its block diffusion for every
   scheduled request at once (`draft.draft_round`: batched forwards of the draft loaded as a
   vLLM model, `draft.VllmDraftModel`, its layers' KV in the target's KV-cache group under the
   same block tables) and writes the verify region
   `[data_0 | copies_0 | data_1 | ...]` (minus the already-known tokens, which are real tokens)
   over the placeholder spec tokens the scheduler reserved.
2. `_prepare_inputs`: vLLM builds positions / slots; we then give the mask copies their data
   token's position (RoPE copy; slots unchanged) and publish the reference-token mask layout
   for the attention (`region.CURRENT`).
3. ONE target forward (vLLM's own).
4. `_sample`: logits at the copies (the only rows the LM head computes,
   `_calc_spec_decode_metadata`) verify the drafts in position order (`ops.greedy_match` over
   all greedy requests at once, or `ops.rejection_sample` per sampled request); the accepted
   tokens + the target's token are the step's output.
   The scheduler (inherited block-diffusion rule) then rolls num_computed_tokens back to the
   round's block start, so the next step re-feeds the finished blocks as the fused commit.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from vllm.v1.outputs import SamplerOutput
from vllm.v1.spec_decode.metadata import SpecDecodeMetadata
from vllm.v1.worker.cpu_model_runner import CPUModelRunner
from vllm.v1.worker.gpu_model_runner import GPUModelRunner

from vllm_dllm_spec import ops
from vllm_dllm_spec.config import DLLMSpecConfig, SamplingKnobs, SimSDParams
from vllm_dllm_spec.denoise import PLACEHOLDER, sampling_knobs
from vllm_dllm_spec.logprobs import gather, requested, step_logprobs
from vllm_dllm_spec.reference.generate import exclude_mask_token
from vllm_dllm_spec.reference.simsd import sampling_probs
from vllm_dllm_spec import region as region_attention
from vllm_dllm_spec.simsd.draft import (
    DraftJob,
    VllmDraftModel,
    draft_model_config,
    draft_round,
    split_draft_groups,
)
from vllm_dllm_spec.worker import DLLMGPUWorker, DLLMRunnerMixin, DLLMWorker, draft_indices, read_rows_metadata

# per-request keys that may override the engine option for one request (the draft's diffusion)
REQUEST_DRAFT_KNOBS = ("denoising_steps", "remasking_strategy", "confidence_threshold", "eb_threshold")


def region_length(params: SimSDParams, num_tokens: int) -> int:
    """Spec tokens of a round: the verify region [data | copies] * K minus the known tokens."""
    B = params.draft.block_length
    return 2 * params.num_draft_blocks * B - num_tokens % B


@dataclass
class SimSDState:
    params: SimSDParams
    knobs: SamplingKnobs
    draft_len: int = 0  # positions whose draft KV is valid in the draft cache
    draft_forwards: int = 0
    drafted: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    host_generator: torch.Generator | None = None  # on CUDA: the request's seeded host generator


@dataclass
class RoundInfo:
    req_id: str
    row: int
    num_tokens: int
    block_start: int
    num_computed: int
    num_blocks: int  # K
    block_length: int  # B
    job: DraftJob

    @property
    def known(self) -> int:  # the block's tokens before the round (prompt or accepted)
        return self.num_tokens - self.block_start


class SimSDRunnerMixin(DLLMRunnerMixin):
    def __init__(self, vllm_config, device):
        super().__init__(vllm_config, device)
        hf = vllm_config.model_config.hf_config
        self.mask_token_id = int(hf.mask_token_id)
        self.vocab_size = int(hf.vocab_size)
        self.model_block = int(hf.block_size)
        self.engine_options = dict((vllm_config.additional_config or {}).get("dllm_spec") or {})
        self.simsd_states: dict[str, SimSDState] = {}
        self.draft: VllmDraftModel | None = None
        self._rounds: dict[str, RoundInfo] = {}
        self._next_drafts: list[list[int]] = []
        self._step_records: dict[str, tuple[int, int, int]] = {}

    # -- set-up ------------------------------------------------------------------------------
    def load_model(self, *args, **kwargs) -> None:
        super().load_model(*args, **kwargs)
        region_attention.install_region_attention(self.model)
        path = self.engine_options.get("draft_model") or self.model_config.model
        self.draft = VllmDraftModel(self.vllm_config, draft_model_config(self.model_config, path), self.device)

    def initialize_metadata_builders(self, kv_cache_config, kernel_block_sizes) -> None:
        super().initialize_metadata_builders(kv_cache_config, kernel_block_sizes)
        if len(self.attn_groups) != 1:
            raise RuntimeError(
                f"SimSD: the draft shares the target's one KV-cache group (its positions and block "
                f"tables), got {len(self.attn_groups)} groups")
        self.attn_groups[0], self.draft.attn_groups = split_draft_groups(
            self.attn_groups[0], set(self.draft.layer_names))
        # vLLM binds the KV cache of the drafter's groups too (initialize_kv_cache_tensors)
        self.drafter.draft_attn_groups = self.draft.attn_groups

    def initialize_kv_cache(self, kv_cache_config, *args, **kwargs) -> None:
        super().initialize_kv_cache(kv_cache_config, *args, **kwargs)
        # the block tables address blocks of this size (kernel blocks where they differ)
        self.draft.cache_block_size = int(self.input_batch.block_table[0].block_size)

    # -- per-request state -------------------------------------------------------------------
    def state_for(self, req_id: str) -> SimSDState:
        st = self.simsd_states.get(req_id)
        if st is None:
            sp = self.requests[req_id].sampling_params
            merged = dict(self.engine_options)
            extra = getattr(sp, "extra_args", None) or {}
            for key in REQUEST_DRAFT_KNOBS:
                if key in extra:
                    merged[key] = extra[key]
            params = DLLMSpecConfig.from_dict(merged).simsd_params(self.model_block)
            st = self.simsd_states[req_id] = SimSDState(params=params, knobs=sampling_knobs(sp))
        return st

    def _host_generator(self, row: int, rid: str) -> torch.Generator | None:
        """The request's generator for the draft policy and the verification, which run on the
        host: vLLM's own on CPU; on CUDA (where vLLM's is a CUDA generator) a host generator
        seeded as vLLM seeds its own, so a seeded request draws what it draws on CPU."""
        gen = self.input_batch.generators.get(row)
        if gen is None or gen.device.type == "cpu":
            return gen
        st = self.state_for(rid)
        if st.host_generator is None:
            st.host_generator = torch.Generator().manual_seed(self.requests[rid].sampling_params.seed)
        return st.host_generator

    def _update_states(self, scheduler_output):
        for r in scheduler_output.finished_req_ids:
            self.simsd_states.pop(r, None)
        for r in scheduler_output.preempted_req_ids or ():
            st = self.simsd_states.get(r)
            if st is not None:  # its KV is freed: the draft recomputes from position 0
                st.draft_len = 0
        result = super()._update_states(scheduler_output)
        self._draft_step(scheduler_output)
        return result

    # -- 1. the draft round ------------------------------------------------------------------
    def _draft_step(self, scheduler_output) -> None:
        self._rounds = {}
        batch = self.input_batch
        spec = scheduler_output.scheduled_spec_decode_tokens
        block_table = batch.block_table[0].get_cpu_tensor()
        jobs = []
        for i, rid in enumerate(batch.req_ids[: batch.num_reqs]):
            n_spec = len(spec.get(rid, ()))
            if n_spec == 0:
                continue  # a prompt chunk: no round in this step
            st = self.state_for(rid)
            num_tokens = int(batch.num_tokens_no_spec[i])
            expected = region_length(st.params, num_tokens)
            if n_spec != expected:
                raise RuntimeError(
                    f"SimSD request {rid}: {n_spec} spec tokens scheduled, the verify region needs "
                    f"{expected} (the config hook keeps the token budget large enough; a bug)")
            B = st.params.draft.block_length
            block_start = num_tokens // B * B
            seq = torch.from_numpy(batch.token_ids_cpu[i, :num_tokens].copy()).long()
            job = DraftJob(seq=seq, draft_len=min(st.draft_len, block_start),
                           block_table=block_table[i].clone(), params=st.params, knobs=st.knobs,
                           generator=self._host_generator(i, rid))
            jobs.append(job)
            self._rounds[rid] = RoundInfo(rid, i, num_tokens, block_start, int(batch.num_computed_tokens_cpu[i]),
                                          st.params.num_draft_blocks, B, job)
        draft_round(self.draft, jobs, self.mask_token_id)
        for rid, info in self._rounds.items():
            st, job = self.simsd_states[rid], info.job
            K, B = info.num_blocks, info.block_length
            st.draft_len = job.draft_len
            st.draft_forwards += job.forwards
            data = job.tokens.view(K, B)
            region = torch.cat([data, torch.full_like(data, self.mask_token_id)], dim=1).flatten()
            values = region[info.known:].tolist()
            batch.token_ids_cpu[info.row, info.num_tokens: info.num_tokens + len(values)] = values
            batch.spec_token_ids[info.row][:] = values

    # -- 2. positions (RoPE copy) and the reference-token mask --------------------------------
    def _prepare_inputs(self, scheduler_output, *args, **kwargs):
        out = super()._prepare_inputs(scheduler_output, *args, **kwargs)
        region_attention.CURRENT = ()
        if not self._rounds:
            return out
        qsl = self.query_start_loc.cpu
        idx, pos, kinds, steps, blocks = [], [], [], [], []
        Q = None
        for rid, info in self._rounds.items():
            st = self.simsd_states[rid]
            K, B = info.num_blocks, info.block_length
            q = 2 * K * B
            if Q is None:
                Q = q
            assert q == Q, "SimSD: one region length per engine (num_draft_blocks, block_length)"
            start = int(qsl[info.row]) + info.block_start - info.num_computed
            idx.append(torch.arange(start, start + q))
            data_pos = info.block_start + torch.arange(K * B).view(K, B)
            copy_pos = data_pos if st.params.rope_copy else data_pos + B
            pos.append(torch.cat([data_pos, copy_pos], dim=1).flatten())
            kinds.append(torch.tensor([ops.KIND_DATA] * B + [ops.KIND_MASK] * B).repeat(K))
            steps.append(info.job.labels.view(K, B).repeat(1, 2).flatten())
            blocks.append(torch.arange(K).repeat_interleave(2 * B))
        region_index = torch.stack(idx)  # [R, Q]
        dev = self.positions.device
        self.positions[region_index.flatten().to(dev)] = torch.cat(pos).to(dev, self.positions.dtype)
        region_attention.CURRENT = (region_attention.simsd_layout(
            region_index, torch.stack(kinds), torch.stack(steps), torch.stack(blocks),
            torch.stack([info.job.block_table for info in self._rounds.values()]),
            torch.tensor([info.block_start for info in self._rounds.values()])).to(dev),)
        return out

    # -- 3. logits rows: only the mask copies of the drafted positions --------------------------
    def _calc_spec_decode_metadata(self, num_draft_tokens: np.ndarray,
                                   cu_num_scheduled_tokens: np.ndarray) -> SpecDecodeMetadata:
        """The logits rows of the step are the mask copies of every request's drafted positions,
        in position order (all that verification reads): the LM head and the row gather skip the
        data rows and vLLM's AR target / bonus rows."""
        if not self._rounds:  # prompt chunks only
            return super()._calc_spec_decode_metadata(num_draft_tokens, cu_num_scheduled_tokens)
        index, per_request = [], np.zeros(len(num_draft_tokens), dtype=np.int64)
        for info in self._rounds.values():
            K, B = info.num_blocks, info.block_length
            d = np.arange(info.known, K * B)  # drafted data positions of the region
            # the region [data_0 | copies_0 | ...] is the request's last 2KB tokens
            index.append(cu_num_scheduled_tokens[info.row] - 2 * K * B + 2 * (d // B) * B + B + d % B)
            per_request[info.row] = d.size
        return read_rows_metadata(self, num_draft_tokens, draft_indices(num_draft_tokens, cu_num_scheduled_tokens),
                                  np.concatenate(index), per_request)

    # -- 4. verification ---------------------------------------------------------------------
    def _sample(self, logits, spec_decode_metadata) -> SamplerOutput:
        """logits [M, V]: the copy rows of `_calc_spec_decode_metadata`, request by request."""
        region_attention.CURRENT = ()
        batch = self.input_batch
        num_reqs = batch.num_reqs
        width = 2
        for info in self._rounds.values():
            width = max(width, info.num_blocks * info.block_length + 1)
        out = torch.full((num_reqs, width), PLACEHOLDER, dtype=torch.int64)
        self._next_drafts = [[] for _ in range(num_reqs)]
        self._step_records = {}
        if spec_decode_metadata is None or not self._rounds:
            return SamplerOutput(sampled_token_ids=out.to(torch.int32), logprobs_tensors=None)
        infos = list(self._rounds.values())
        R = len(infos)
        n = torch.tensor([info.num_blocks * info.block_length - info.known for info in infos])  # [R] drafted
        first_row = n.cumsum(0) - n  # [R] each request's first logits row
        starts = first_row.tolist()
        drafts = torch.full((R, int(n.max())), -1, dtype=torch.int64)  # [R, n_max] the drafted tokens
        for r, info in enumerate(infos):
            drafts[r, : int(n[r])] = info.job.tokens[info.known:]
        # verification runs on the host (the draft's distributions live there)
        copy_logits = exclude_mask_token(logits[: int(n.sum())].cpu(), self.mask_token_id)  # [M, V]
        accepted = torch.zeros(R, dtype=torch.int64)
        nxt = torch.full((R,), -1, dtype=torch.int64)
        greedy = torch.tensor([self.simsd_states[info.req_id].params.verification == "greedy_match"
                               for info in infos])  # [R]
        if bool(greedy.any()):
            g = greedy.nonzero()[:, 0]
            row_req = torch.repeat_interleave(torch.arange(R), n)  # [M] request of every logits row
            row_col = torch.arange(row_req.numel()) - first_row[row_req]  # [M] its drafted rank
            target = torch.full((R, drafts.shape[1] + 1), -1, dtype=torch.int64)  # no bonus column
            target[row_req, row_col] = copy_logits.argmax(-1)
            accepted[g], nxt[g] = ops.greedy_match(drafts[g], n[g], target[g], n[g])
        for r in (~greedy).nonzero()[:, 0].tolist():  # MRS: each request on its own generator
            info, st = infos[r], self.simsd_states[infos[r].req_id]
            job, k = info.job, int(n[r])
            rows_logits = copy_logits[starts[r]: starts[r] + k]  # [k, V]
            p_target = sampling_probs(rows_logits, st.knobs)
            p_target = torch.cat([p_target, torch.zeros_like(p_target[:1])])[None]
            q = job.probs[info.known:] if job.probs is not None else torch.nn.functional.one_hot(
                drafts[r, :k], p_target.shape[-1]).to(p_target.dtype)
            a, t = ops.rejection_sample(
                drafts[r, None, :k], n[r, None], q[None], p_target, n[r, None],
                torch.rand(1, k, generator=job.generator, dtype=p_target.dtype),
                torch.rand(1, generator=job.generator, dtype=p_target.dtype))
            accepted[r], nxt[r] = a, t
        # the step's tokens: the accepted drafts, then the target's token at the first rejection
        cols = torch.arange(drafts.shape[1] + 1)
        padded = torch.cat([drafts, torch.full((R, 1), -1, dtype=torch.int64)], 1)
        new = torch.where(cols < accepted[:, None], padded,
                          torch.where(cols == accepted[:, None], nxt[:, None], PLACEHOLDER))  # [R, n_max + 1]
        num_new = accepted + (nxt >= 0)  # [R]
        rows_out = torch.tensor([info.row for info in infos])
        out[rows_out, : new.shape[1]] = new
        grid = step_logprobs([self.requests[r].sampling_params for r in batch.req_ids[:num_reqs]],
                             self.vocab_size, width)
        for r, (rid, info) in enumerate(self._rounds.items()):
            st, job = self.simsd_states[rid], info.job
            K, B = info.num_blocks, info.block_length
            a, m = int(accepted[r]), int(num_new[r])
            k = requested(self.requests[rid].sampling_params, self.vocab_size) if grid is not None else None
            if k is not None:  # every new token's distribution: the target's at its copy
                grid.put(info.row, slice(0, m), *gather(copy_logits[starts[r]: starts[r] + m], new[r, :m], k))
            drafted = job.labels > 0
            num_drafted = int(drafted.sum())
            st.drafted.append(num_drafted)
            st.accepted.append(a)
            whole = int((drafted.view(K, B).sum(1).cumsum(0) <= a).sum())
            st.draft_len = min(st.draft_len, info.block_start + whole * B)
            self._next_drafts[info.row] = [self.mask_token_id] * region_length(st.params, info.num_tokens + m)
            self._step_records[rid] = (num_drafted, a, job.forwards)
        return SamplerOutput(sampled_token_ids=out.to(torch.int32),
                             logprobs_tensors=None if grid is None else grid.tensors())

    def sample_tokens(self, grammar_output):
        output = super().sample_tokens(grammar_output)
        if hasattr(output, "req_ids"):
            output.simsd_records = dict(self._step_records)
        return output

    def propose_draft_token_ids(self, scheduler_output, sampled_token_ids, *args, **kwargs):
        return self._next_drafts


class SimSDModelRunner(SimSDRunnerMixin, CPUModelRunner):
    pass


class SimSDGPUModelRunner(SimSDRunnerMixin, GPUModelRunner):
    pass


class SimSDWorker(DLLMWorker):
    runner_cls = SimSDModelRunner


class SimSDGPUWorker(DLLMGPUWorker):
    runner_cls = SimSDGPUModelRunner
