"""Spiffy worker / model runner: PSD's region of block copies, filled from a draft graph.

Per request the runner keeps its in-progress block's exact state S (`st.block`, at denoising
step `st.step`) and, once a forward has given S's logits, the draft states instantiated from
them (`reference.spiffy.instantiate`: the graph's formulas applied to S under those stale
logits). `st.chain` = [S, open draft states...] is what PSD's region code writes into the
`graph_budget` block copies (copy 0 = S; padding repeats the last state; a block's first step
has no drafts: copy 0 = its masks). One engine step = one forward over the copies; `_sample`:

    cur = S (copy 0)
    loop: nxt = plain decoding's step of cur on cur's own verified logits (argmax or a seeded
               draw, at step st.step + walk length)
          nxt without masks -> the block is finished (emitted whole, no more forwards)
          nxt equal to a verified draft state -> cur = it (its copy's logits are exact)
          else -> S = nxt; drafts = instantiate(nxt, cur's logits)

Greedy requests evaluate every copy's next state at every walk step at once and follow the path
with `ops.graph_accept`; sampled ones draw step by step (batched over requests per step), so a
seeded request consumes its generator exactly as plain decoding does. Tokens, step_map and
forwards equal `reference.spiffy.spiffy_generate` (tests/test_vllm_spiffy.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from vllm.v1.outputs import SamplerOutput
from vllm.v1.worker.cpu_model_runner import CPUModelRunner
from vllm.v1.worker.gpu_model_runner import GPUModelRunner

from vllm_dllm_spec import ops
from vllm_dllm_spec import region as region_attention
from vllm_dllm_spec.config import DenoiseParams, SamplingKnobs
from vllm_dllm_spec.denoise import ENTROPY, PLACEHOLDER, predict_greedy, sampling_knobs
from vllm_dllm_spec.logprobs import requested, step_logprobs
from vllm_dllm_spec.psd.runner import PSDRunnerMixin, PSDState, padded
from vllm_dllm_spec.reference.spiffy import instantiate, load_graph
from vllm_dllm_spec.walk import PolicyTable, greedy_next_states, sampled_next_state
from vllm_dllm_spec.worker import DLLMGPUWorker, DLLMWorker

GREEDY = SamplingKnobs()


@dataclass
class SpiffyState(PSDState):
    knobs: SamplingKnobs = GREEDY  # the request's sampling (temperature 0: greedy)


class SpiffyRunnerMixin(PSDRunnerMixin):
    def __init__(self, vllm_config, device):
        super().__init__(vllm_config, device)
        self.graph = load_graph(self.engine_options["draft_graph"], self.block_length)

    def _num_copies(self) -> int:
        return int(self.engine_options["graph_budget"])

    def _new_state(self, params: DenoiseParams, sampling_params) -> SpiffyState:
        return SpiffyState(params=params, knobs=sampling_knobs(sampling_params),
                           num_logprobs=requested(sampling_params, self.vocab_size))

    def _draft_chain(self, st: SpiffyState, logits: torch.Tensor) -> None:
        """The next step's copies: S, then the graph's open states instantiated from S's stale
        logits [B, V] (complete drafts need no copy: the walk reaches them for free)."""
        mask_id = self.mask_token_id
        drafts = instantiate(st.block, logits.cpu(), self.graph, mask_id=mask_id, budget=self.depth,
                             remasking_strategy=st.params.remasking_strategy)  # [N, B]
        st.chain = [st.block, *drafts[(drafts == mask_id).any(-1)]]

    # -- the walk ----------------------------------------------------------------------------
    def _walk(self, infos, states, copies, spec_logits, index):
        """Follows every request's accepted path. states [R, C, B] (copy 0 = S), copies [R]
        (copies holding a state), index [R, C, B] the spec_logits row of each copy position.
        -> path_len [R], path [R, C] (node n = copy n + 1; -1 after the end), final [R, B]."""
        R, C, B = states.shape
        mask_id = self.mask_token_id
        table = PolicyTable.of([self.psd_states[rid].params for rid, _ in infos],
                               max(self.psd_states[rid].step for rid, _ in infos) + C)
        base_step = torch.tensor([self.psd_states[rid].step for rid, _ in infos])  # [R]
        greedy = torch.tensor([self.psd_states[rid].knobs.temperature == 0.0 for rid, _ in infos])  # [R]
        nodes, num_nodes = states[:, 1:], copies - 1  # [R, N, B], [R]
        path_len = torch.zeros(R, dtype=torch.int64)
        path = torch.full((R, C), -1, dtype=torch.int64)
        final = torch.empty((R, B), dtype=torch.int64)
        if bool(greedy.any()):
            g = greedy.nonzero().flatten()
            need_entropy = bool((table.strategy[g] == ENTROPY).any())
            rows = index[g].to(spec_logits.device)  # [G, C, B]
            tok, conf, ent = (t.cpu().view(rows.shape)
                              for t in predict_greedy(spec_logits[rows.flatten()], need_entropy))
            steps = (base_step[g, None, None] + torch.arange(C)).expand(len(g), C, C)  # [G, C, D = C]
            sub = PolicyTable(table.strategy[g], table.threshold[g], table.eb_threshold[g], table.transfer[g])
            nxt = greedy_next_states(states[g], tok, conf, ent, steps, sub, mask_id)  # [G, C, D, B]
            plen, gpath = ops.graph_accept(nodes[g], nxt, num_nodes[g])
            last = torch.where(plen > 0, gpath.gather(1, (plen - 1).clamp(min=0)[:, None])[:, 0], -1)
            path_len[g], path[g] = plen, gpath
            final[g] = nxt[torch.arange(len(g)), last + 1, plen]  # path_len <= N < D
        sampled = (~greedy).nonzero().flatten().tolist()
        cur = {j: -1 for j in sampled}  # the node each walking request stands on (-1: S)
        for d in range(C):  # one real step per walk step, batched over the walking requests
            if not cur:
                break
            walking = list(cur)
            drawn = torch.full((len(walking), C, 1, B), -1, dtype=torch.int64)  # only row 0 is looked up
            for i, j in enumerate(walking):  # each draw needs the request's own generator
                rid, info = infos[j]
                st = self.psd_states[rid]
                c = cur[j] + 1
                lg = spec_logits[index[j, c].to(spec_logits.device)]  # [B, V]
                drawn[i, 0, 0] = sampled_next_state(states[j, c], lg, st.step + d, j, table, st.knobs,
                                                    self.input_batch.generators.get(info.row), mask_id)
            w = torch.tensor(walking)
            hit_len, hit = ops.graph_accept(nodes[w], drawn, num_nodes[w])  # one lookup each
            for i, j in enumerate(walking):
                if int(hit_len[i]):  # drafts are open states: a finished block never matches
                    cur[j] = int(hit[i, 0])
                    path[j, d] = cur[j]
                    path_len[j] = d + 1
                else:  # a miss or a finished block: the walk ends on this real next state
                    final[j] = drawn[i, 0, 0]
                    del cur[j]
        return path_len, path, final

    def _sample(self, logits, spec_decode_metadata) -> SamplerOutput:
        region_attention.CURRENT = None
        batch, B, mask_id, C = self.input_batch, self.block_length, self.mask_token_id, self.depth
        num_reqs = batch.num_reqs
        out = torch.full((num_reqs, B + 1), PLACEHOLDER, dtype=torch.int64)  # spare column: see worker.py
        self._next_drafts = [[] for _ in range(num_reqs)]
        self.drafter.finished_step_maps = {}
        if spec_decode_metadata is None or not self._steps:
            return SamplerOutput(sampled_token_ids=out.to(logits.device, torch.int32), logprobs_tensors=None)
        spec_logits = logits[spec_decode_metadata.target_logits_indices + 1]  # [T, V] AT the spec tokens (a copy)
        spec_logits[:, mask_id] = float("-inf")  # the mask token is never a prediction
        grid = step_logprobs([self.requests[r].sampling_params for r in batch.req_ids[:num_reqs]],
                             self.vocab_size, B + 1)
        offsets = torch.tensor([0] + list(spec_decode_metadata.num_draft_tokens)).cumsum(0)
        infos = list(self._steps.items())
        R = len(infos)
        index = self._copy_rows([i for _, i in infos], offsets)  # [R, C, B]
        chains = [self.psd_states[rid].chain or [self.psd_states[rid].block] for rid, _ in infos]
        copies = torch.tensor([len(ch) for ch in chains])  # [R]
        states = torch.stack([padded(ch, C) for ch in chains])  # [R, C, B]
        path_len, path, final = self._walk(infos, states, copies, spec_logits, index)

        # the copy each walk point stands on ([R, C + 1]: S, the path's nodes, then repeated)
        walk_copy = torch.cat([torch.zeros((R, 1), dtype=torch.int64), path + 1], 1)
        walk_copy = torch.where(torch.arange(C + 1) <= path_len[:, None], walk_copy,
                                walk_copy.gather(1, path_len[:, None]))
        walk_states = states.gather(1, walk_copy[:, :, None].expand(R, C + 1, B))  # [R, C + 1, B]
        # a position unmasked by the walk was unmasked by transition t = (walk points masked there) - 1
        masked = ((walk_states == mask_id) & (torch.arange(C + 1)[None, :, None] <= path_len[:, None, None])).sum(1)
        new = (states[:, 0] == mask_id) & (final != mask_id)  # [R, B]
        t = (masked - 1).clamp(min=0)  # [R, B]
        source = index.gather(1, walk_copy.gather(1, t)[:, None, :]).squeeze(1)  # [R, B] spec row deciding it
        for r, (rid, info) in enumerate(infos):  # per-request bookkeeping (state and outputs)
            st = self.psd_states[rid]
            st.unmasked_at[new[r]] = st.step + t[r, new[r]]
            if st.num_logprobs is not None:
                self._keep_logprobs(st, new[r], final[r], spec_logits[source[r].to(spec_logits.device)])
            st.step += int(path_len[r]) + 1
            st.block = final[r]
            k = info.num_tokens - info.block_start  # the block's prompt tokens
            if bool((st.block == mask_id).any()):
                self._draft_chain(st, spec_logits[index[r, int(walk_copy[r, path_len[r]])].to(spec_logits.device)])
                self._next_drafts[info.row] = [mask_id] * self._region_length(info.num_tokens)
                continue
            out[info.row, : B - k] = st.block[k:]
            if grid is not None and st.block_logprobs is not None:
                grid.put(info.row, slice(0, B - k), *(x[k:] for x in st.block_logprobs))
            self.drafter.finished_step_maps[rid] = st.unmasked_at[k:].tolist()
            st.block_start = -1  # the next block starts fully masked
            self._next_drafts[info.row] = [mask_id] * self._region_length(info.num_tokens + B - k)
        return SamplerOutput(sampled_token_ids=out.to(logits.device, torch.int32),
                             logprobs_tensors=None if grid is None else grid.tensors())


class SpiffyModelRunner(SpiffyRunnerMixin, CPUModelRunner):
    pass


class SpiffyGPUModelRunner(SpiffyRunnerMixin, GPUModelRunner):
    pass


class SpiffyWorker(DLLMWorker):
    runner_cls = SpiffyModelRunner


class SpiffyGPUWorker(DLLMGPUWorker):
    runner_cls = SpiffyGPUModelRunner
