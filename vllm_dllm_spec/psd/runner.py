"""PSD worker / model runner: `PSDRunnerMixin` over the block-diffusion mixin, mixed into a CPU
runner (`PSDModelRunner`) and a GPU one (`PSDGPUModelRunner`; see vllm_dllm_spec.worker).

Per request the runner keeps (as one slot of `psd.slots.BlockSlots`) its in-progress block S
and, once a forward has given the logits of S, the chain of states drafted from them
(`reference.psd`: the remasking policy applied again and again to the same logits). One engine
step = one forward over the request's region, the copies of its block that carry a state (token
indices block_start + c * B + j, positions block_start + j, each copy attending to the cached
prefix and to itself only; between 1 and `draft_depth` copies, so requests' regions differ in
length. Copy 0 is a plain block for the normal kernel; copies 1.. go through the region
attention, one layout per length):
- no chain yet (a block's first step): one copy, S;
- otherwise: copy c = the chain's (c + 1)-th state, for the chain's states that still have masks.
The runner proposes each request's next region length (`_emit`), so vLLM schedules, and the
model computes, no padding copies.
`_sample` reads each copy's logits: the first step yields logits(S); a verify step keeps the
deepest chain state the policy confirms (hierarchical acceptance). A state without masks is the
finished block, emitted whole; otherwise the logits of the accepted state draft the next chain.
Every stage runs batched over the step's requests (loops remain only over the draft depth,
over requests that asked for logprobs, and over finished blocks for their step_map records).
Tokens, step_map and forwards equal `reference.psd.psd_generate` (tests/test_vllm_psd.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from vllm.logger import init_logger
from vllm.v1.outputs import SamplerOutput
from vllm.v1.spec_decode.metadata import SpecDecodeMetadata
from vllm.v1.worker.cpu_model_runner import CPUModelRunner
from vllm.v1.worker.gpu_model_runner import GPUModelRunner

from vllm_dllm_spec import ops
from vllm_dllm_spec import region as region_attention
from vllm_dllm_spec.denoise import ENTROPY, PLACEHOLDER, predict_greedy, resolve_request_params, sampling_knobs
from vllm_dllm_spec.logprobs import gather, requested, step_logprobs
from vllm_dllm_spec.psd.slots import BlockSlots
from vllm_dllm_spec.walk import PolicyTable, greedy_next_states
from vllm_dllm_spec.worker import DLLMGPUWorker, DLLMRunnerMixin, DLLMWorker, draft_indices, read_rows_metadata

logger = init_logger("vllm." + __name__)


@dataclass
class Step:
    """The requests of this step that evaluate block copies, in input-batch order."""

    req_ids: list[str]
    rows: torch.Tensor  # [R] input-batch row
    slots: torch.Tensor  # [R] BlockSlots slot
    num_tokens: torch.Tensor  # [R] tokens before the region (the block's prompt tokens included)
    block_start: torch.Tensor  # [R]
    num_computed: torch.Tensor  # [R]
    copies: torch.Tensor | None = None  # [R, C, B] the states the region evaluates (padded: the last repeated)
    num_copies: torch.Tensor | None = None  # [R] copies that carry a state (the rest is padding)
    read: torch.Tensor | None = None  # [R, C * B] region positions whose logits are read

    @property
    def known(self) -> torch.Tensor:  # [R] the block's prompt tokens
        return self.num_tokens - self.block_start


@dataclass
class Verified:
    """One step's verified logits: spec_logits [M, V] (mask token -inf) the rows of the read
    positions (`Step.read`), index [R, C, B] the spec_logits row of every read position (0
    elsewhere: a row nothing reads), the greedy prediction there (token / confidence / entropy
    [R, C, B], on the host, 0 elsewhere) and the requests' policy."""

    spec_logits: torch.Tensor
    index: torch.Tensor
    token: torch.Tensor
    confidence: torch.Tensor
    entropy: torch.Tensor
    table: PolicyTable

    def at_copy(self, copy: torch.Tensor):
        """copy [R] -> token, confidence, entropy [R, B] of that copy of each request."""
        R, _, B = self.token.shape
        pick = copy.view(R, 1, 1).expand(R, 1, B)
        return tuple(t.gather(1, pick)[:, 0] for t in (self.token, self.confidence, self.entropy))

    def logits(self, r: int, copy: int) -> torch.Tensor:  # [B, V] (rows of unread positions: any)
        return self.spec_logits[self.index[r, copy].to(self.spec_logits.device)]


class PSDRunnerMixin(DLLMRunnerMixin):
    def __init__(self, vllm_config, device):
        super().__init__(vllm_config, device)
        hf = vllm_config.model_config.hf_config
        self.mask_token_id = int(hf.mask_token_id)
        self.block_length = int(hf.block_size)
        self.vocab_size = int(hf.vocab_size)
        self.engine_options = dict((vllm_config.additional_config or {}).get("dllm_spec") or {})
        self.depth = self._num_copies()
        self.slots = BlockSlots(self.block_length, self.depth, self.mask_token_id,
                                vllm_config.scheduler_config.max_num_seqs)
        self._step: Step | None = None
        self._next_drafts: list[list[int]] = []

    def _num_copies(self) -> int:
        """Block copies in the region of every step."""
        return int(self.engine_options["draft_depth"])

    def load_model(self, *args, **kwargs) -> None:
        super().load_model(*args, **kwargs)
        region_attention.install_region_attention(self.model)

    # -- per-request state -------------------------------------------------------------------
    def _update_states(self, scheduler_output):
        self.slots.release(scheduler_output.finished_req_ids)
        # a preempted request's KV is freed: its in-progress block restarts
        self.slots.release(scheduler_output.preempted_req_ids or ())
        result = super()._update_states(scheduler_output)
        self._fill_regions(scheduler_output)
        return result

    def _slot_for(self, rid: str) -> int:
        s = self.slots.slot_of.get(rid)
        if s is None:  # a request's first step: its knobs, once
            sp = self.requests[rid].sampling_params
            try:
                params = resolve_request_params(self.engine_options, sp.extra_args, self.block_length)
            except ValueError as err:  # the front end validates; never take the engine down
                logger.warning("request %s: %s; using the engine's dllm_spec knobs", rid, err)
                params = resolve_request_params(self.engine_options, None, self.block_length)
            s = self.slots.add(rid, params, sampling_knobs(sp), requested(sp, self.vocab_size))
        return s

    def _fill_regions(self, scheduler_output) -> None:
        """Writes every scheduled request's region (its block copies) over the placeholder spec
        tokens the scheduler reserved; a request at a new block starts it from its prompt tokens
        and masks."""
        self._step = None
        batch, B, C, mask_id, sl = self.input_batch, self.block_length, self.depth, self.mask_token_id, self.slots
        req_ids = batch.req_ids[: batch.num_reqs]
        spec = scheduler_output.scheduled_spec_decode_tokens
        n_spec = np.array([len(spec.get(rid, ())) for rid in req_ids], dtype=np.int64)
        rows = np.flatnonzero(n_spec)  # the others are prompt chunks
        if rows.size == 0:
            return
        num_tokens = batch.num_tokens_no_spec[rows].astype(np.int64)  # [R]
        rids = [req_ids[i] for i in rows]
        slots = torch.tensor([self._slot_for(rid) for rid in rids])
        block_start = num_tokens // B * B
        step = Step(rids, torch.from_numpy(rows), slots, torch.from_numpy(num_tokens), torch.from_numpy(block_start),
                    torch.from_numpy(batch.num_computed_tokens_cpu[rows].astype(np.int64)))
        known = step.known
        new = sl.block_start[slots] != step.block_start  # [R] a new block: fully masked after its prompt tokens
        if bool(new.any()):
            n = new.numpy()
            toks = torch.from_numpy(batch.token_ids_cpu[rows[n, None], block_start[n, None] + np.arange(B)]).long()
            ns = slots[new]
            sl.block[ns] = torch.where(torch.arange(B) < known[new, None], toks, mask_id)
            sl.block_start[ns], sl.step[ns], sl.chain_len[ns], sl.unmasked_at[ns] = step.block_start[new], 0, 0, -1
        step.copies, step.num_copies = sl.copies(slots)  # [R, C, B], [R]
        copies = step.copies
        length = step.num_copies.numpy() * B - num_tokens % B  # [R] the copies after the block's prompt tokens
        bad = np.flatnonzero(n_spec[rows] != length)
        if bad.size:
            i = int(bad[0])
            raise RuntimeError(f"{type(self).__name__} request {rids[i]}: {n_spec[rows[i]]} spec tokens scheduled, "
                               f"its region needs {length[i]} (the runner proposed it and the hook sizes the "
                               f"token budget; a bug)")
        # a step only ever reads predictions at the masks of the copies that carry a state (the
        # states a real step starts from); padding copies and unmasked positions are never read
        live = torch.arange(C)[None, :, None] < step.num_copies[:, None, None]  # [R, C, 1]
        step.read = ((copies == mask_id) & live).view(len(rows), C * B)
        # region index q >= known of request r holds copies[r].flatten()[q]
        r = np.repeat(np.arange(len(rows)), length)  # [sum length]
        j = np.arange(r.size) - np.repeat(np.cumsum(length) - length, length)
        values = copies.view(len(rows), C * B).numpy()[r, known.numpy()[r] + j]
        batch.token_ids_cpu[rows[r], num_tokens[r] + j] = values
        for i, v in zip(rows.tolist(), np.split(values, np.cumsum(length)[:-1])):
            batch.spec_token_ids[i][:] = v.tolist()
        self._step = step

    # -- positions (each copy at the block's positions) and the block-diagonal mask ----------
    def _prepare_inputs(self, scheduler_output, *args, **kwargs):
        out = super()._prepare_inputs(scheduler_output, *args, **kwargs)
        region_attention.CURRENT = ()
        step = self._step
        if step is None:
            return out
        B = self.block_length
        starts = self.query_start_loc.cpu[step.rows].long() + step.block_start - step.num_computed  # [R]
        lengths = step.num_copies * B  # [R] region tokens
        r = torch.repeat_interleave(torch.arange(len(lengths)), lengths)  # [sum lengths] token -> request
        q = torch.arange(r.numel()) - (lengths.cumsum(0) - lengths)[r]  # [sum lengths] index in its region
        dev = self.positions.device
        # every copy at the block's positions
        self.positions[(starts[r] + q).to(dev)] = (step.block_start[r] + q % B).to(dev, self.positions.dtype)
        # Copy 0 sees the prefix and itself: a plain block, which the normal kernel computes
        # (block-causal split). Only copies 1.. (each blind to the others) need the region op, so
        # a one-copy request (every block's first step) has no region at all.
        tables = self.input_batch.block_table[0].get_cpu_tensor()[step.rows]
        layouts = []
        for c in torch.unique(step.num_copies).tolist():  # one rectangular layout per region length
            if c == 1:
                continue
            g = (step.num_copies == c).nonzero()[:, 0]
            region_index = starts[g, None] + B + torch.arange((c - 1) * B)  # [Rc, (c - 1) * B] copies 1..
            layouts.append(region_attention.block_copies_layout(
                region_index, tables[g], step.block_start[g], c - 1, B).to(dev))
        region_attention.CURRENT = tuple(layouts)
        return out

    # -- logits rows: only the read positions ------------------------------------------------
    def _calc_spec_decode_metadata(self, num_draft_tokens: np.ndarray,
                                   cu_num_scheduled_tokens: np.ndarray) -> SpecDecodeMetadata:
        """The logits rows of the step are its region's read positions (`Step.read`), request by
        request in region order: the LM head and the [rows, V] reductions skip the padding copies,
        the positions a copy already holds and vLLM's AR target / bonus rows."""
        step = self._step
        if step is None:  # prompt chunks only
            return super()._calc_spec_decode_metadata(num_draft_tokens, cu_num_scheduled_tokens)
        rows = step.rows.numpy()
        r, q = (t.numpy() for t in step.read.nonzero(as_tuple=True))  # [M] request, region index
        # the region is the last num_copies * B - known tokens of a request: region index q is
        # flat token cu_num_scheduled_tokens[row] - num_copies * B + q
        logits_index = (cu_num_scheduled_tokens[rows] - step.num_copies.numpy() * self.block_length)[r] + q  # [M]
        per_request = np.zeros(len(num_draft_tokens), dtype=np.int64)
        per_request[rows] = step.read.sum(1).numpy()
        return read_rows_metadata(self, num_draft_tokens, draft_indices(num_draft_tokens, cu_num_scheduled_tokens),
                                  logits_index, per_request)

    # -- verification, acceptance and the next chain -----------------------------------------
    def _verified(self, step: Step, logits: torch.Tensor) -> Verified:
        """logits [M, V]: the rows of the read positions (`_calc_spec_decode_metadata`) -> their
        greedy prediction, placed at the copy positions."""
        logits[:, self.mask_token_id] = float("-inf")  # the mask token is never a prediction
        read = step.read.view(step.copies.shape)  # [R, C, B]
        index = torch.zeros(read.shape, dtype=torch.int64)
        index[read] = torch.arange(logits.shape[0])
        table = self.slots.policy(step.slots)
        need_entropy = bool((table.strategy == ENTROPY).any())
        tok, conf, ent = (torch.zeros(read.shape, dtype=t.dtype).masked_scatter_(read, t.cpu())
                          for t in predict_greedy(logits, need_entropy))
        return Verified(logits, index, tok, conf, ent, table)

    def _accepted_depths(self, step: Step, v: Verified) -> torch.Tensor:
        """Hierarchical acceptance of every verifying request at once (what
        `reference.psd.accepted_depth` does for one): chain state c + 1 stands iff the policy on
        chain state c's verified logits, at step s + 1 + c, gives it, and so did every state
        before it. Through `ops.graph_accept` with the chain as parents and only the diagonal
        next states (state c is reached after c steps). -> chain states kept [R] (0: no chain,
        a block's first step)."""
        B, C, mask_id, sl = self.block_length, self.depth, self.mask_token_id, self.slots
        chain, chain_len = sl.chain[step.slots], sl.chain_len[step.slots]  # [R, C, B], [R]
        verifying = chain_len > 0
        if not bool(verifying.any()):
            return torch.zeros_like(chain_len)
        R = chain.shape[0]
        steps = (sl.step[step.slots] + 1)[:, None, None] + torch.arange(C)[None, :, None]  # [R, C, 1]
        nxt = greedy_next_states(chain, v.token, v.confidence, v.entropy, steps, v.table, mask_id)[:, :, 0]
        c = torch.arange(C)
        verified = c[None, :] < step.num_copies[:, None]  # [R, C]
        diagonal = torch.full((R, C, C, B), -1, dtype=torch.int64)  # [R, N + 1, D, B], N = C - 1
        diagonal[:, c, c] = torch.where(verified[..., None], nxt, -1)
        path_len, _ = ops.graph_accept(chain[:, 1:], diagonal, (chain_len - 1).clamp(min=0),
                                       ops.chain_parents(R, C - 1))
        return torch.where(verifying, path_len + 1, 0)

    def _draft_chain(self, step: Step, v: Verified, block: torch.Tensor, steps: torch.Tensor,
                     source: torch.Tensor) -> None:
        """The next chains: the policy applied again and again to the logits of the current
        state block [R, B] (at denoising step steps [R]; its logits: copy source [R]), stopping
        at a state without masks (`reference.psd.draft_chain`, batched)."""
        R, B = block.shape
        mask_id, sl = self.mask_token_id, self.slots
        tok, conf, ent = v.at_copy(source)  # [R, B]
        chain = torch.empty((R, self.depth, B), dtype=torch.int64)
        chain_len = torch.zeros(R, dtype=torch.int64)
        state, rows = block, torch.arange(R)
        for i in range(self.depth):  # the same logits each step: only the masks left change
            is_mask = state == mask_id
            chain_len += is_mask.any(1)
            state = torch.where(v.table.select(rows, steps + i, is_mask, conf, ent), tok, state)
            chain[:, i] = state
        sl.chain[step.slots], sl.chain_len[step.slots] = chain, chain_len
        for r in self._logprob_rows(step):  # the chain's first transition is decided by these logits
            sl.chain_logits[int(step.slots[r])] = v.logits(r, int(source[r]))

    def _logprob_rows(self, step: Step) -> list[int]:
        """The step's requests that asked for logprobs (their bookkeeping is a loop: rare)."""
        return self.slots.logprobs[step.slots].nonzero()[:, 0].tolist()

    def _keep_logprobs(self, slot: int, chosen: torch.Tensor, state: torch.Tensor, logits: torch.Tensor) -> None:
        """The logprobs of the positions one transition unmasked (`chosen` [B] bool, tokens from
        `state` [B]) under the logits [B, V] it was decided by (mask token already -inf)."""
        sl, B = self.slots, self.block_length
        w = sl.num_logprobs[slot] + 1
        if slot not in sl.block_logprobs:
            sl.block_logprobs[slot] = (torch.zeros((B, w), dtype=torch.int64), torch.zeros((B, w), dtype=torch.float32),
                                       torch.zeros(B, dtype=torch.int64))
        dev = logits.device
        ids, values, ranks = (t.cpu() for t in gather(logits[chosen.to(dev)], state[chosen], w - 1))
        lp = sl.block_logprobs[slot]
        lp[0][chosen], lp[1][chosen], lp[2][chosen] = ids, values, ranks

    def _sample(self, logits, spec_decode_metadata) -> SamplerOutput:
        region_attention.CURRENT = ()
        batch, B, C, mask_id, sl = self.input_batch, self.block_length, self.depth, self.mask_token_id, self.slots
        num_reqs = batch.num_reqs
        out = torch.full((num_reqs, B + 1), PLACEHOLDER, dtype=torch.int64)  # spare column: see worker.py
        self._next_drafts = [[] for _ in range(num_reqs)]
        self.drafter.finished_step_maps = {}
        step = self._step
        if spec_decode_metadata is None or step is None:
            return SamplerOutput(sampled_token_ids=out.to(logits.device, torch.int32), logprobs_tensors=None)
        grid = step_logprobs([self.requests[r].sampling_params for r in batch.req_ids[:num_reqs]],
                             self.vocab_size, B + 1)
        v = self._verified(step, logits)
        accepted = self._accepted_depths(step, v)  # [R]
        R, s = len(step.req_ids), step.slots
        chain, old = sl.chain[s], sl.block[s]  # [R, C, B], [R, B]
        reached = chain.gather(1, (accepted - 1).clamp(min=0).view(R, 1, 1).expand(R, 1, B))[:, 0]
        block = torch.where((accepted > 0)[:, None], reached, old)  # [R, B]
        # a position the chain unmasked was unmasked by transition t = (kept states masked there)
        t = ((chain == mask_id) & (torch.arange(C)[None, :, None] < accepted[:, None, None])).sum(1)  # [R, B]
        new = (old == mask_id) & (block != mask_id)
        unmasked_at = torch.where(new, sl.step[s, None] + t, sl.unmasked_at[s])  # [R, B]
        steps = sl.step[s] + accepted  # [R]
        lp_rows = self._logprob_rows(step)
        for r in lp_rows:  # accepted transition i was decided by logits(S) (i = 0) or copy i - 1
            slot, prev = int(s[r]), old[r]
            for i in range(int(accepted[r])):
                source = sl.chain_logits[slot] if i == 0 else v.logits(r, i - 1)
                self._keep_logprobs(slot, (prev == mask_id) & (chain[r, i] != mask_id), chain[r, i], source)
                prev = chain[r, i]
        source = (accepted - 1).clamp(min=0)  # the copy holding the current state's logits
        self._draft_chain(step, v, block, steps, source)
        # the policy's next step finishes the block: taken now, no forward needed
        first = sl.chain[s, 0]  # [R, B]
        now = (block == mask_id).any(1) & ~(first == mask_id).any(1)  # [R]
        for r in (r for r in lp_rows if bool(now[r])):
            self._keep_logprobs(int(s[r]), block[r] == mask_id, first[r], sl.chain_logits[int(s[r])])
        unmasked_at = torch.where(now[:, None] & (block == mask_id), steps[:, None], unmasked_at)
        block = torch.where(now[:, None], first, block)
        sl.block[s], sl.step[s], sl.unmasked_at[s] = block, steps + now, unmasked_at
        self._emit(step, block, out, grid)
        return SamplerOutput(sampled_token_ids=out.to(logits.device, torch.int32),
                             logprobs_tensors=None if grid is None else grid.tensors())

    def _emit(self, step: Step, block: torch.Tensor, out: torch.Tensor, grid) -> None:
        """Finished blocks (no mask left in block [R, B]) become their rows of `out` (generated
        tokens first), with their step_map and logprobs; every request's next region is masks
        (placeholders `_fill_regions` overwrites), as many as its next step's copies: the same
        block's live chain states, or the next block's first step (one copy) from its start."""
        B, mask_id, sl = self.block_length, self.mask_token_id, self.slots
        done = ~(block == mask_id).any(1)  # [R]
        after = torch.where(done, step.block_start + B, step.num_tokens)  # [R] tokens before the next region
        num_copies = torch.where(done, 1, sl.num_copies(step.slots))  # [R] the next step's copies
        for row, n in zip(step.rows.tolist(), (num_copies * B - after % B).tolist()):
            self._next_drafts[row] = [mask_id] * n
        if not bool(done.any()):
            return
        d = done.nonzero()[:, 0]  # [F]
        known = step.known[d]  # [F]
        col = torch.arange(B) + known[:, None]  # [F, B]
        out[step.rows[d], :B] = torch.where(col < B, block[d].gather(1, col.clamp(max=B - 1)), PLACEHOLDER)
        slots = step.slots[d]
        step_maps = sl.unmasked_at[slots].tolist()
        for f, (r, k, slot, row) in enumerate(zip(d.tolist(), known.tolist(), slots.tolist(), step.rows[d].tolist())):
            self.drafter.finished_step_maps[step.req_ids[r]] = step_maps[f][k:]
            lp = sl.block_logprobs.pop(slot, None)
            if grid is not None and lp is not None:
                grid.put(row, slice(0, B - k), *(x[k:] for x in lp))
        sl.block_start[slots] = -1  # the next block starts fully masked

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
