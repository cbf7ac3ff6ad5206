"""Spiffy worker / model runner: PSD's region of block copies, filled from a draft graph.

Per request the runner keeps (a slot of `psd.slots.BlockSlots`) its in-progress block's exact
state S (at denoising step s) and, once a forward has given S's logits, the draft states
instantiated from them (`reference.spiffy.instantiate`: the graph's formulas applied to S under
those stale logits). The slot's chain = [S, open draft states...] is what PSD's region code
writes into the `graph_budget` block copies (copy 0 = S; padding repeats the last state; a
block's first step has no drafts: copy 0 = its masks). One engine step = one forward over the
copies; `_sample`:

    cur = S (copy 0)
    loop: nxt = plain decoding's step of cur on cur's own verified logits (argmax or a seeded
               draw, at step s + walk length)
          nxt without masks -> the block is finished (emitted whole, no more forwards)
          nxt equal to a verified draft state -> cur = it (its copy's logits are exact)
          else -> S = nxt; drafts = instantiate(nxt, cur's logits)

Greedy requests evaluate every copy's next state at every walk step at once and follow the path
with `ops.graph_accept`; sampled ones draw step by step (batched over requests per step), so a
seeded request consumes its generator exactly as plain decoding does. The bookkeeping after the
walk and the drafting (`spiffy.drafts`: the oracle's `instantiate` over all drafting requests at
once) are batched over requests. Tokens, step_map and forwards equal `reference.spiffy.spiffy_generate`
(tests/test_vllm_spiffy.py).
"""
from __future__ import annotations

import torch
from vllm.v1.outputs import SamplerOutput
from vllm.v1.worker.cpu_model_runner import CPUModelRunner
from vllm.v1.worker.gpu_model_runner import GPUModelRunner

from vllm_dllm_spec import ops
from vllm_dllm_spec import region as region_attention
from vllm_dllm_spec.denoise import PLACEHOLDER
from vllm_dllm_spec.logprobs import step_logprobs
from vllm_dllm_spec.psd.runner import PSDRunnerMixin, Step, Verified
from vllm_dllm_spec.reference.spiffy import load_graph, num_token_ranks
from vllm_dllm_spec.spiffy.drafts import open_drafts, priority_order, ranked_tokens
from vllm_dllm_spec.walk import PolicyTable, greedy_next_states, sampled_next_state
from vllm_dllm_spec.worker import DLLMGPUWorker, DLLMWorker


class SpiffyRunnerMixin(PSDRunnerMixin):
    def __init__(self, vllm_config, device):
        super().__init__(vllm_config, device)
        self.graph = load_graph(self.engine_options["draft_graph"], self.block_length)
        top = int(self.graph._tok_rank.max()) if self.graph.nodes else 1
        self.num_ranks = num_token_ranks(top, self.vocab_size)  # as the oracle's stale_ranks

    def _num_copies(self) -> int:
        return int(self.engine_options["graph_budget"])

    def _draft_chain(self, step: Step, v: Verified, block: torch.Tensor, steps: torch.Tensor,
                     source: torch.Tensor) -> None:
        """The next step's copies: S = block [R, B], then the graph's open states instantiated
        from S's stale logits (copy source [R]; complete drafts need no copy: the walk reaches
        them for free), batched over the drafting requests (`spiffy.drafts`)."""
        R, B = block.shape
        mask_id, sl = self.mask_token_id, self.slots
        chain = block[:, None, :].repeat(1, self.depth, 1)  # [R, C, B]
        chain_len = torch.ones(R, dtype=torch.int64)
        is_mask = block == mask_id  # [R, B]
        drafting = is_mask.any(1).nonzero()[:, 0]  # [K]
        if drafting.numel() == 0:  # every block finished: no next step
            return
        if self.graph.nodes:
            # the stale distribution: copy `source`'s prediction and logits rows, at the roots' masks
            _, confidence, entropy = v.at_copy(source)  # [R, B]
            rows = v.index.gather(1, source.view(R, 1, 1).expand(R, 1, B))[:, 0]  # [R, B] spec rows
            root, masks = block[drafting], is_mask[drafting]  # [K, B]
            order = priority_order(masks, v.table.strategy[drafting], confidence[drafting], entropy[drafting])
            logits = v.spec_logits[rows[drafting][masks].to(v.spec_logits.device)]  # [Mk, V]
            tokens = torch.zeros((len(drafting), B, self.num_ranks), dtype=torch.int64)  # [K, B, J]
            tokens[masks] = ranked_tokens(logits.float().softmax(-1), self.num_ranks).cpu()
            drafts, count = open_drafts(root, order, tokens, self.graph, mask_id, self.depth)
            chain[drafting, 1:], chain_len[drafting] = drafts, count + 1
        sl.chain[step.slots], sl.chain_len[step.slots] = chain, chain_len

    # -- the walk ----------------------------------------------------------------------------
    def _walk(self, step: Step, v: Verified):
        """Follows every request's accepted path through its copies (step.copies [R, C, B], copy
        0 = S). -> path_len [R], path [R, C] (node n = copy n + 1; -1 after the end), final [R, B]."""
        states, sl, mask_id = step.copies, self.slots, self.mask_token_id
        R, C, B = states.shape
        base_step = sl.step[step.slots]  # [R]
        greedy = sl.greedy[step.slots]  # [R]
        nodes, num_nodes = states[:, 1:], step.num_copies - 1  # [R, N, B], [R]
        path_len = torch.zeros(R, dtype=torch.int64)
        path = torch.full((R, C), -1, dtype=torch.int64)
        final = torch.empty((R, B), dtype=torch.int64)
        if bool(greedy.any()):
            g = greedy.nonzero()[:, 0]
            steps = (base_step[g, None, None] + torch.arange(C)).expand(len(g), C, C)  # [G, C, D = C]
            t = v.table
            sub = PolicyTable(t.strategy[g], t.threshold[g], t.eb_threshold[g], t.transfer[g])
            nxt = greedy_next_states(states[g], v.token[g], v.confidence[g], v.entropy[g], steps, sub,
                                     mask_id)  # [G, C, D, B]
            plen, gpath = ops.graph_accept(nodes[g], nxt, num_nodes[g])
            last = torch.where(plen > 0, gpath.gather(1, (plen - 1).clamp(min=0)[:, None])[:, 0], -1)
            path_len[g], path[g] = plen, gpath
            final[g] = nxt[torch.arange(len(g)), last + 1, plen]  # path_len <= N < D
        sampled = (~greedy).nonzero()[:, 0].tolist()
        cur = {j: -1 for j in sampled}  # the node each walking request stands on (-1: S)
        rows, slots, generators = step.rows.tolist(), step.slots.tolist(), self.input_batch.generators
        for d in range(C):  # one real step per walk step, batched over the walking requests
            if not cur:
                break
            walking = list(cur)
            drawn = torch.full((len(walking), C, 1, B), -1, dtype=torch.int64)  # only row 0 is looked up
            for i, j in enumerate(walking):  # each draw needs the request's own generator
                drawn[i, 0, 0] = sampled_next_state(states[j, cur[j] + 1], v.logits(j, cur[j] + 1),
                                                    int(base_step[j]) + d, j, v.table, sl.knobs[slots[j]],
                                                    generators.get(rows[j]), mask_id)
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
        region_attention.CURRENT = ()
        batch, B, mask_id, C, sl = self.input_batch, self.block_length, self.mask_token_id, self.depth, self.slots
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
        states, s = step.copies, step.slots  # [R, C, B], [R]
        R = len(s)
        path_len, path, final = self._walk(step, v)

        # the copy each walk point stands on ([R, C + 1]: S, the path's nodes, then repeated)
        walk_copy = torch.cat([torch.zeros((R, 1), dtype=torch.int64), path + 1], 1)
        walk_copy = torch.where(torch.arange(C + 1) <= path_len[:, None], walk_copy,
                                walk_copy.gather(1, path_len[:, None]))
        walk_states = states.gather(1, walk_copy[:, :, None].expand(R, C + 1, B))  # [R, C + 1, B]
        # a position unmasked by the walk was unmasked by transition t = (walk points masked there) - 1
        masked = ((walk_states == mask_id) & (torch.arange(C + 1)[None, :, None] <= path_len[:, None, None])).sum(1)
        new = (states[:, 0] == mask_id) & (final != mask_id)  # [R, B]
        t = (masked - 1).clamp(min=0)  # [R, B]
        for r in self._logprob_rows(step):  # a position's logits: the copy the walk stood on there
            source = v.index[r].gather(0, walk_copy[r].gather(0, t[r])[None, :])[0]  # [B] spec rows
            self._keep_logprobs(int(s[r]), new[r], final[r], v.spec_logits[source.to(v.spec_logits.device)])
        steps = sl.step[s] + path_len + 1
        sl.unmasked_at[s] = torch.where(new, sl.step[s, None] + t, sl.unmasked_at[s])
        sl.block[s], sl.step[s] = final, steps
        self._draft_chain(step, v, final, steps, walk_copy.gather(1, path_len[:, None])[:, 0])
        self._emit(step, final, out, grid)
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
