"""PSD worker / model runner: `PSDRunnerMixin` over the block-diffusion mixin, mixed into a CPU
runner (`PSDModelRunner`) and a GPU one (`PSDGPUModelRunner`; see vllm_dllm_spec.worker).

Per request the runner keeps its in-progress block S and, once a forward has given the logits
of S, the chain of states drafted from them (`reference.psd`: the remasking policy applied
again and again to the same logits). One engine step = one forward over the request's region,
`draft_depth` copies of its block (token indices block_start + c * B + j, positions
block_start + j, each copy attending to the cached prefix and to itself only):
- no chain yet (a block's first step): copy 0 = S, the other copies repeat it (unused);
- otherwise: copy c = the chain's (c + 1)-th state, the last one repeated as padding.
`_sample` reads each copy's logits: the first step yields logits(S); a verify step keeps the
deepest chain state the policy confirms (hierarchical acceptance). A state without masks is the
finished block, emitted whole; otherwise the logits of the accepted state draft the next chain.
Tokens, step_map and forwards equal `reference.psd.psd_generate` (tests/test_vllm_psd.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from vllm.logger import init_logger
from vllm.v1.outputs import SamplerOutput
from vllm.v1.worker.cpu_model_runner import CPUModelRunner
from vllm.v1.worker.gpu_model_runner import GPUModelRunner

from vllm_dllm_spec import ops
from vllm_dllm_spec import region as region_attention
from vllm_dllm_spec.config import DenoiseParams
from vllm_dllm_spec.denoise import ENTROPY, PLACEHOLDER, predict_greedy, resolve_request_params
from vllm_dllm_spec.logprobs import gather, requested, step_logprobs
from vllm_dllm_spec.reference.generate import exclude_mask_token
from vllm_dllm_spec.reference.psd import draft_chain
from vllm_dllm_spec.walk import PolicyTable, greedy_next_states
from vllm_dllm_spec.worker import DLLMGPUWorker, DLLMRunnerMixin, DLLMWorker

logger = init_logger("vllm." + __name__)


@dataclass
class PSDState:
    params: DenoiseParams
    block_start: int = -1
    block: torch.Tensor | None = None  # [B] the known state S (prompt tokens, unmasked, masks)
    step: int = 0  # denoising steps S has taken
    unmasked_at: torch.Tensor | None = None  # [B] step that unmasked each position, -1 if not yet
    chain: list[torch.Tensor] = field(default_factory=list)  # drafted states S_1 .. (from logits(S))
    chosen: list[torch.Tensor] = field(default_factory=list)  # [B] bool: what each transition unmasked
    num_logprobs: int | None = None  # the request's top-k logprobs (None: none asked)
    chain_logits: torch.Tensor | None = None  # [B, V] logits(S) the chain was drafted from (logprobs only)
    # per position, its logprobs from the step that unmasked it: ids [B, k+1], values, ranks [B]
    block_logprobs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None


@dataclass
class StepInfo:
    row: int
    num_tokens: int
    block_start: int
    num_computed: int
    num_copies: int  # copies that carry a state to evaluate (the rest is padding)


def padded(states: list[torch.Tensor], n: int) -> torch.Tensor:
    """Block states [B] each -> [n, B]: the states, then the last one repeated (padding copies)."""
    return torch.stack(states + [states[-1]] * (n - len(states)))


class PSDRunnerMixin(DLLMRunnerMixin):
    def __init__(self, vllm_config, device):
        super().__init__(vllm_config, device)
        hf = vllm_config.model_config.hf_config
        self.mask_token_id = int(hf.mask_token_id)
        self.block_length = int(hf.block_size)
        self.vocab_size = int(hf.vocab_size)
        self.engine_options = dict((vllm_config.additional_config or {}).get("dllm_spec") or {})
        self.depth = self._num_copies()
        self.psd_states: dict[str, PSDState] = {}
        self._steps: dict[str, StepInfo] = {}
        self._next_drafts: list[list[int]] = []

    def _num_copies(self) -> int:
        """Block copies in the region of every step."""
        return int(self.engine_options["draft_depth"])

    def load_model(self, *args, **kwargs) -> None:
        super().load_model(*args, **kwargs)
        region_attention.install_region_attention(self.model)

    def _region_length(self, num_tokens: int) -> int:
        return self.depth * self.block_length - num_tokens % self.block_length

    # -- per-request state -------------------------------------------------------------------
    def _update_states(self, scheduler_output):
        for r in scheduler_output.finished_req_ids:
            self.psd_states.pop(r, None)
        for r in scheduler_output.preempted_req_ids or ():
            self.psd_states.pop(r, None)  # its KV is freed: the in-progress block restarts
        result = super()._update_states(scheduler_output)
        self._fill_regions(scheduler_output)
        return result

    def _state_for(self, rid: str) -> PSDState:
        st = self.psd_states.get(rid)
        if st is None:
            sp = self.requests[rid].sampling_params
            try:
                params = resolve_request_params(self.engine_options, sp.extra_args, self.block_length)
            except ValueError as err:  # the front end validates; never take the engine down
                logger.warning("request %s: %s; using the engine's dllm_spec knobs", rid, err)
                params = resolve_request_params(self.engine_options, None, self.block_length)
            st = self.psd_states[rid] = self._new_state(params, sp)
        return st

    def _new_state(self, params: DenoiseParams, sampling_params) -> PSDState:
        return PSDState(params=params, num_logprobs=requested(sampling_params, self.vocab_size))

    def _copy_rows(self, infos: list[StepInfo], offsets: torch.Tensor) -> torch.Tensor:
        """The spec_logits row of every copy position [R, C, B]. Region index q = c * B + j is spec
        row offsets[row] + q - known (q >= known: known = the block's prompt tokens); a prompt
        token's position (q < known) is never a mask, so any row does."""
        C, B = self.depth, self.block_length
        known = torch.tensor([i.num_tokens - i.block_start for i in infos])  # [R]
        start = offsets[torch.tensor([i.row for i in infos])]  # [R]
        return ((torch.arange(C * B)[None, :] - known[:, None]).clamp(min=0) + start[:, None]).view(-1, C, B)

    def _fill_regions(self, scheduler_output) -> None:
        """Writes every scheduled request's region (its block copies) over the placeholder spec
        tokens the scheduler reserved."""
        self._steps = {}
        batch, B, mask_id = self.input_batch, self.block_length, self.mask_token_id
        spec = scheduler_output.scheduled_spec_decode_tokens
        for i, rid in enumerate(batch.req_ids[: batch.num_reqs]):
            n_spec = len(spec.get(rid, ()))
            if n_spec == 0:
                continue  # a prompt chunk
            num_tokens = int(batch.num_tokens_no_spec[i])
            if n_spec != self._region_length(num_tokens):
                raise RuntimeError(f"PSD request {rid}: {n_spec} spec tokens scheduled, the region needs "
                                   f"{self._region_length(num_tokens)} (the hook sizes the token budget; a bug)")
            st = self._state_for(rid)
            block_start = num_tokens // B * B
            if st.block_start != block_start:  # a new block: fully masked after its prompt tokens
                known = torch.from_numpy(batch.token_ids_cpu[i, block_start:num_tokens].copy()).long()
                st.block_start, st.step, st.chain, st.chosen = block_start, 0, [], []
                st.block = torch.cat([known, torch.full((B - known.numel(),), mask_id)])
                st.unmasked_at = torch.full((B,), -1)
                st.block_logprobs = None
            states = [s for s in st.chain if bool((s == mask_id).any())] or [st.block]
            values = padded(states, self.depth).flatten()[num_tokens - block_start:].tolist()
            batch.token_ids_cpu[i, num_tokens: num_tokens + len(values)] = values
            batch.spec_token_ids[i][:] = values
            self._steps[rid] = StepInfo(i, num_tokens, block_start, int(batch.num_computed_tokens_cpu[i]),
                                        len(states))

    # -- positions (each copy at the block's positions) and the block-diagonal mask ----------
    def _prepare_inputs(self, scheduler_output, *args, **kwargs):
        out = super()._prepare_inputs(scheduler_output, *args, **kwargs)
        region_attention.CURRENT = None
        if not self._steps:
            return out
        B, D = self.block_length, self.depth
        Q = D * B
        qsl = self.query_start_loc.cpu
        tables = self.input_batch.block_table[0].get_cpu_tensor()
        infos = list(self._steps.values())
        starts = torch.tensor([int(qsl[s.row]) + s.block_start - s.num_computed for s in infos])
        region_index = starts[:, None] + torch.arange(Q)  # [R, Q]
        block_starts = torch.tensor([s.block_start for s in infos])
        positions = block_starts[:, None] + torch.arange(B).repeat(D)  # [R, Q]: every copy at the block
        dev = self.positions.device
        self.positions[region_index.flatten().to(dev)] = positions.flatten().to(dev, self.positions.dtype)
        region_attention.CURRENT = region_attention.block_copies_layout(
            region_index, tables[torch.tensor([s.row for s in infos])], block_starts, D, B).to(dev)
        return out

    # -- acceptance and the next chain -------------------------------------------------------
    def _draft_chain(self, st: PSDState, logits: torch.Tensor) -> None:
        st.chain, st.chosen = draft_chain(st.params, st.step, st.block, logits, self.depth, self.mask_token_id)
        if st.num_logprobs is not None:
            st.chain_logits = logits

    def _advance(self, st: PSDState, accepted: int, verified: torch.Tensor | None = None) -> None:
        """Accepts the chain's first `accepted` transitions; `verified` [copies, B, V] are the
        logits of the chain states (transition i >= 1 was decided by state i - 1's)."""
        for i in range(accepted):
            st.unmasked_at[st.chosen[i]] = st.step + i
            if st.num_logprobs is not None:  # a loop over accepted steps (<= draft_depth)
                source = st.chain_logits if i == 0 else verified[i - 1]
                self._keep_logprobs(st, st.chosen[i], st.chain[i], source)
        st.block = st.chain[accepted - 1]
        st.step += accepted

    def _keep_logprobs(self, st: PSDState, chosen: torch.Tensor, state: torch.Tensor, logits: torch.Tensor) -> None:
        """The logprobs of the positions one transition unmasked (`chosen` [B] bool, tokens from
        `state` [B]) under the logits it was decided by (mask excluded, as the policy)."""
        w = st.num_logprobs + 1
        if st.block_logprobs is None:
            B = self.block_length
            st.block_logprobs = (torch.zeros((B, w), dtype=torch.int64), torch.zeros((B, w), dtype=torch.float32),
                                 torch.zeros(B, dtype=torch.int64))
        ids, values, ranks = gather(exclude_mask_token(logits[chosen], self.mask_token_id), state[chosen], w - 1)
        st.block_logprobs[0][chosen], st.block_logprobs[1][chosen], st.block_logprobs[2][chosen] = ids, values, ranks

    def _accepted_depths(self, spec_logits: torch.Tensor, offsets: list[int]) -> dict[str, int]:
        """Hierarchical acceptance of every verifying request at once (what
        `reference.psd.accepted_depth` does for one): chain state c + 1 stands iff the policy on
        chain state c's verified logits, at step st.step + 1 + c, gives it, and so did every
        state before it. Through `ops.graph_accept` with the chain as parents and only the
        diagonal next states (state c is reached after c steps)."""
        verifying = [(rid, info) for rid, info in self._steps.items() if self.psd_states[rid].chain]
        if not verifying:
            return {}
        B, C, mask_id = self.block_length, self.depth, self.mask_token_id
        R = len(verifying)
        sts = [self.psd_states[rid] for rid, _ in verifying]
        states = torch.stack([padded(st.chain, C) for st in sts])  # [R, C, B]
        rows = self._copy_rows([info for _, info in verifying], torch.tensor(offsets))  # [R, C, B]
        lg = spec_logits[rows.flatten().to(spec_logits.device)]  # [R * C * B, V] (a copy)
        lg[:, mask_id] = float("-inf")  # the mask token is never a prediction
        table = PolicyTable.of([st.params for st in sts], max(st.step for st in sts) + C + 1)
        tok, conf, ent = (t.cpu().view(R, C, B) for t in predict_greedy(lg, bool((table.strategy == ENTROPY).any())))
        steps = torch.tensor([st.step + 1 for st in sts])[:, None, None] + torch.arange(C)[None, :, None]  # [R, C, 1]
        nxt = greedy_next_states(states, tok, conf, ent, steps, table, mask_id)[:, :, 0]  # [R, C, B]
        c = torch.arange(C)
        verified = c[None, :] < torch.tensor([info.num_copies for _, info in verifying])[:, None]  # [R, C]
        diagonal = torch.full((R, C, C, B), -1, dtype=torch.int64)  # [R, N + 1, D, B], N = C - 1
        diagonal[:, c, c] = torch.where(verified[..., None], nxt, -1)
        num_nodes = torch.tensor([len(st.chain) - 1 for st in sts])  # [R]
        path_len, _ = ops.graph_accept(states[:, 1:], diagonal, num_nodes, ops.chain_parents(R, C - 1))
        return {rid: n + 1 for (rid, _), n in zip(verifying, path_len.tolist())}

    def _sample(self, logits, spec_decode_metadata) -> SamplerOutput:
        region_attention.CURRENT = None
        batch, B, mask_id = self.input_batch, self.block_length, self.mask_token_id
        num_reqs = batch.num_reqs
        out = torch.full((num_reqs, B + 1), PLACEHOLDER, dtype=torch.int64)  # spare column: see worker.py
        self._next_drafts = [[] for _ in range(num_reqs)]
        self.drafter.finished_step_maps = {}
        if spec_decode_metadata is None or not self._steps:
            return SamplerOutput(sampled_token_ids=out.to(torch.int32), logprobs_tensors=None)
        # [T, V] AT the spec tokens, on the host, where the chain policy and its blocks live
        spec_logits = logits[spec_decode_metadata.target_logits_indices + 1].cpu()
        grid = step_logprobs([self.requests[r].sampling_params for r in batch.req_ids[:num_reqs]],
                             self.vocab_size, B + 1)
        offsets = [0]
        for n in spec_decode_metadata.num_draft_tokens:
            offsets.append(offsets[-1] + n)
        accepted = self._accepted_depths(spec_logits, offsets)  # rid -> chain steps kept
        for rid, info in self._steps.items():
            st = self.psd_states[rid]
            known = info.num_tokens - info.block_start
            # region index q holds spec row offsets[row] + q - known (q >= known); rows of the
            # prompt tokens (q < known) are never masks: any logits do
            q = (torch.arange(info.num_copies * B) - known).clamp(min=0) + offsets[info.row]
            copy_logits = spec_logits[q].view(info.num_copies, B, -1)  # [copies, B, V]
            if not st.chain:  # the block's first step: logits of S itself
                self._draft_chain(st, copy_logits[0])
            else:
                self._advance(st, accepted[rid], copy_logits)
                if bool((st.block == mask_id).any()):
                    self._draft_chain(st, copy_logits[accepted[rid] - 1])
            if not bool((st.chain[0] == mask_id).any()) and bool((st.block == mask_id).any()):
                self._advance(st, 1)  # the policy's next step finishes the block: no forward needed
            if bool((st.block == mask_id).any()):
                self._next_drafts[info.row] = [mask_id] * self._region_length(info.num_tokens)
                continue
            out[info.row, : B - known] = st.block[known:]
            if grid is not None and st.block_logprobs is not None:
                grid.put(info.row, slice(0, B - known), *(t[known:] for t in st.block_logprobs))
            self.drafter.finished_step_maps[rid] = st.unmasked_at[known:].tolist()
            st.block_start = -1  # the next block starts fully masked
            self._next_drafts[info.row] = [mask_id] * self._region_length(info.num_tokens + B - known)
        return SamplerOutput(sampled_token_ids=out.to(torch.int32),
                             logprobs_tensors=None if grid is None else grid.tensors())

    def propose_draft_token_ids(self, scheduler_output, sampled_token_ids, *args, **kwargs):
        return self._next_drafts


class PSDModelRunner(PSDRunnerMixin, CPUModelRunner):
    pass


class PSDGPUModelRunner(PSDRunnerMixin, GPUModelRunner):
    pass


class PSDWorker(DLLMWorker):
    runner_cls = PSDModelRunner


class PSDGPUWorker(DLLMGPUWorker):
    runner_cls = PSDGPUModelRunner
