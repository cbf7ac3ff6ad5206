"""The SimSD draft model inside vLLM: the plugin's own vLLM model class (`SDARForCausalLM`,
loaded through vLLM's loader, TP-sharded like the target) with its attention on the block-causal
backend over its OWN layers' KV cache. Its attention layers register in the engine's static
forward context, so vLLM's KV-cache manager sizes, allocates and pages them in the target's one
KV-cache group: draft positions equal target positions and the draft reads and writes its cache
through the target's block tables (no second KV-cache manager; the draft's KV takes its share of
the cache memory).

`draft_round` runs one SimSD draft round for every request of the step at once (reference:
`reference.simsd.draft_round`): each loop iteration is ONE batched draft forward over every
request still denoising (requests at different blocks / steps mixed), then the batched
denoising update (`denoise.select_to_unmask`, the reference's selection rules). The pure-PyTorch
draft stays only in the oracle.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import torch
from vllm.config import ModelConfig, VllmConfig
from vllm.config.vllm import get_layers_from_vllm_config
from vllm.forward_context import set_forward_context
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.model_loader import get_model
from vllm.v1.attention.backend import CommonAttentionMetadata

from vllm_dllm_spec.config import REMASKING_STRATEGIES, SimSDParams, SamplingKnobs
from vllm_dllm_spec.denoise import predict_greedy, select_to_unmask
from vllm_dllm_spec.reference.generate import predict
from vllm_dllm_spec.region import cache_slots

# the draft's module prefix: its attention layers are "dllm_draft.model.layers.{i}.self_attn.attn"
DRAFT_PREFIX = "dllm_draft"


def draft_model_config(target: ModelConfig, path: str) -> ModelConfig:
    """The draft's ModelConfig: its own checkpoint with the target's tokenizer, dtype, context
    length and eager flag; the SDAR fields the config hook resolved for the target (block
    length, mask id) are the draft's too (the runner denoises both with the target's)."""
    draft = ModelConfig(
        model=path, runner="draft", tokenizer=target.tokenizer, tokenizer_mode=target.tokenizer_mode,
        trust_remote_code=target.trust_remote_code, dtype=target.dtype, seed=target.seed,
        max_model_len=target.max_model_len, enforce_eager=target.enforce_eager,
        max_logprobs=target.max_logprobs)
    for attr in ("block_size", "mask_token_id"):
        setattr(draft.hf_config, attr, getattr(target.hf_config, attr))
    return draft


def split_draft_groups(groups: list, draft_layers: set[str]) -> tuple[list, list]:
    """Split one KV-cache group's attention groups into (target's, draft's). A group holding
    both (a self-draft: same backend and shapes) becomes two halves that share its metadata
    builders, so the target's forward builds no metadata for draft layers and vice versa."""
    target, draft = [], []
    for g in groups:
        mine = [n for n in g.layer_names if n in draft_layers]
        theirs = [n for n in g.layer_names if n not in draft_layers]
        if theirs:
            target.append(g if not mine else dataclasses.replace(g, layer_names=theirs))
        if mine:
            draft.append(g if not theirs else dataclasses.replace(g, layer_names=mine))
    return target, draft


class VllmDraftModel:
    """The draft on vLLM's layers. `attn_groups` and `cache_block_size` are set by the runner
    once the KV cache exists. Its forward returns the block logits on the host, where the
    draft's denoising policy runs."""

    def __init__(self, vllm_config: VllmConfig, model_config: ModelConfig, device) -> None:
        from vllm.compilation.backends import set_model_tag

        # a shallow copy: the compilation config (static forward context) stays shared, so the
        # draft's attention layers join the engine's KV-cache spec and cache binding
        self.vllm_config = copy.copy(vllm_config)
        self.vllm_config.model_config = model_config
        before = set(get_layers_from_vllm_config(vllm_config, Attention))
        with set_model_tag(DRAFT_PREFIX):
            self.model = get_model(vllm_config=self.vllm_config, model_config=model_config, prefix=DRAFT_PREFIX)
        self.layer_names = [n for n in get_layers_from_vllm_config(vllm_config, Attention) if n not in before]
        if not self.layer_names:
            raise RuntimeError("SimSD draft: loading it registered no attention layers")
        self.device = torch.device(device)
        self.attn_groups: list = []
        self.cache_block_size = 0

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, query_lens: torch.Tensor, first_pos: torch.Tensor,
                block_tables: torch.Tensor, read: torch.Tensor) -> torch.Tensor:
        """One batched forward. Request r's query: query_lens[r] tokens of `ids` (flat [T]; its
        uncommitted tokens, then its block) at positions first_pos[r] + i, block-causal (the
        backend's split) over its cached positions < first_pos[r] and itself; vLLM writes the
        query's KV through the slots. read [R, B] bool: the block positions (the last B query
        tokens of each request) whose logits the policy reads. Returns their logits, request by
        request in position order: [read.sum(), V] float32 on the host (the LM head skips the
        other rows)."""
        R, B, n = query_lens.numel(), read.shape[1], query_lens
        qsl = torch.zeros(R + 1, dtype=torch.int32)
        qsl[1:] = n.cumsum(0)
        T = int(qsl[-1])
        req = torch.repeat_interleave(torch.arange(R), n)  # [T] token -> request
        pos = first_pos[req] + torch.arange(T) - qsl[:-1].long()[req]  # [T]
        seq_lens = (first_pos + n).to(torch.int32)  # [R]
        slots = cache_slots(block_tables.long()[req], pos[:, None], self.cache_block_size).squeeze(1)  # [T]
        dev = self.device
        slots_dev, pos_dev = slots.to(dev), pos.to(dev)
        common = CommonAttentionMetadata(
            query_start_loc=qsl.to(dev), query_start_loc_cpu=qsl, seq_lens=seq_lens.to(dev), num_reqs=R,
            num_actual_tokens=T, max_query_len=int(n.max()), max_seq_len=int(seq_lens.max()),
            block_table_tensor=block_tables.to(dev, torch.int32), slot_mapping=slots_dev,
            seq_lens_cpu_upper_bound=seq_lens, positions=pos_dev)
        metadata = {}
        for group in self.attn_groups:
            built = group.metadata_builders[0].build(common_prefix_len=0, common_attn_metadata=common)
            metadata.update(dict.fromkeys(group.layer_names, built))
        with set_forward_context(metadata, self.vllm_config, num_tokens=T,
                                 slot_mapping=dict.fromkeys(self.layer_names, slots_dev)):
            hidden = self.model(input_ids=ids.to(dev), positions=pos_dev)  # [T, hidden]
        rows = (qsl[1:, None].long() - B + torch.arange(B))[read]  # [N] the read rows of every block
        return self.model.compute_logits(hidden[rows.to(dev)]).float().cpu()  # [N, V]


@dataclass
class DraftJob:
    """One request's draft round (inputs filled by the runner; outputs by `draft_round`)."""

    seq: torch.Tensor  # the request's final tokens (prompt + accepted) [num_tokens]
    draft_len: int  # positions whose draft KV is in the cache
    block_table: torch.Tensor  # the request's block-table row
    params: SimSDParams
    knobs: SamplingKnobs
    generator: torch.Generator | None
    # outputs
    tokens: torch.Tensor | None = None  # [K * B]
    labels: torch.Tensor | None = None  # [K * B]: 0 known, s + 1 unmasked at draft step s
    probs: torch.Tensor | None = None  # [K * B, V] the draft's distributions (MRS; None: greedy)
    forwards: int = 0


def draft_round(draft: VllmDraftModel, jobs: list[DraftJob], mask_id: int) -> None:
    """Batched twin of `reference.simsd.draft_round` for every job; sets the outputs and
    job.draft_len to the draft cache length after the round (before the verification's
    truncation). Per-request state lives in tensors over the jobs; only sampled requests' draws
    (each on its own generator, in the reference's order) loop per request."""
    if not jobs:
        return
    R, B = len(jobs), jobs[0].params.draft.block_length
    num_blocks = torch.tensor([j.params.num_draft_blocks for j in jobs])  # [R]
    strategy = torch.tensor([REMASKING_STRATEGIES.index(j.params.draft.remasking_strategy) for j in jobs])
    threshold = torch.tensor([j.params.draft.confidence_threshold for j in jobs], dtype=torch.float32)
    eb_threshold = torch.tensor([j.params.draft.eb_threshold for j in jobs], dtype=torch.float32)
    schedules = [j.params.draft.num_transfer_tokens() for j in jobs]
    transfer = torch.ones(R, max(map(len, schedules)) + 1, dtype=torch.long)  # [R, S + 1]: 1 past the schedule
    for r, counts in enumerate(schedules):
        transfer[r, : len(counts)] = torch.as_tensor(counts)
    sampled = [r for r, j in enumerate(jobs) if j.knobs.temperature != 0.0]
    greedy = torch.tensor([j.knobs.temperature == 0.0 for j in jobs])  # [R]
    need_entropy = bool((greedy & (strategy == REMASKING_STRATEGIES.index("entropy_bounded"))).any())
    tables = torch.stack([j.block_table for j in jobs])  # [R, max_blocks]

    num_tokens = torch.tensor([j.seq.numel() for j in jobs])  # [R]
    block_start = num_tokens // B * B
    draft_len = torch.tensor([j.draft_len for j in jobs])  # [R]
    blocks = torch.full((R, B), mask_id, dtype=torch.long)  # [R, B] the block being denoised
    for r, j in enumerate(jobs):
        known = j.seq[int(block_start[r]):]
        blocks[r, : known.numel()] = known
    unmasked_at = torch.full((R, B), -1, dtype=torch.long)  # [R, B] draft step that unmasked a column
    step = torch.zeros(R, dtype=torch.long)
    k = torch.zeros(R, dtype=torch.long)  # the draft block being denoised
    forwards = torch.zeros(R, dtype=torch.long)
    prev_block = torch.zeros(R, B, dtype=torch.long)  # [R, B] finished, uncommitted draft block
    has_prev = torch.zeros(R, dtype=torch.bool)
    out_tokens = torch.zeros(R, int(num_blocks.max()), B, dtype=torch.long)  # [R, K, B]
    out_labels = torch.zeros(R, int(num_blocks.max()), B, dtype=torch.long)
    block_probs: dict[int, torch.Tensor] = {}  # sampled request -> [B, V] of the current block
    out_probs: dict[int, list[torch.Tensor]] = {r: [] for r in sampled}
    active = torch.ones(R, dtype=torch.bool)
    first = True
    while bool(active.any()):
        idx = active.nonzero().squeeze(1)  # [A]
        if first:  # the requests' uncommitted prefixes (ragged) before their blocks
            ids = torch.cat([t for r, j in enumerate(jobs)
                             for t in (j.seq[int(draft_len[r]): int(block_start[r])], blocks[r])])
            query_lens = block_start - draft_len + B
        else:  # then at most the previous draft block before the block
            rows = torch.cat([prev_block[idx], blocks[idx]], dim=1)  # [A, 2B]
            valid = torch.cat([has_prev[idx, None].expand(-1, B), torch.ones(len(idx), B, dtype=torch.bool)], 1)
            ids = rows[valid]
            query_lens = B + B * has_prev[idx].long()
        current = blocks[idx]
        is_mask = current == mask_id  # [A, B]
        g = greedy[idx]  # [A]
        # a greedy policy reads only the masks' predictions; a sampled block draws all B rows
        # (the reference's random stream), so its logits are read whole
        read = is_mask | ~g[:, None]  # [A, B]
        logits = draft.forward(ids, query_lens, draft_len[idx], tables[idx], read)  # [N, V]
        logits[:, mask_id] = float("-inf")  # never a prediction (reference `exclude_mask_token`)
        A = len(idx)
        row_of = torch.full((A, B), -1, dtype=torch.long)  # [A, B] logits row of every read position
        row_of[read] = torch.arange(logits.shape[0])
        token = torch.zeros(A, B, dtype=torch.long)
        conf = torch.zeros(A, B)
        ent = torch.zeros(A, B)
        greedy_masks = is_mask & g[:, None]  # [A, B]
        if bool(greedy_masks.any()):
            token[greedy_masks], conf[greedy_masks], ent[greedy_masks] = predict_greedy(
                logits[row_of[greedy_masks]], need_entropy)
        draws = {}
        for a in (~g).nonzero().squeeze(1).tolist():  # the reference's predict per block (its random stream)
            r = int(idx[a])
            token[a], conf[a], ent[a], draws[r] = predict(logits[row_of[a]], jobs[r].knobs, jobs[r].generator)
        k_t = torch.minimum(transfer[idx, step[idx].clamp(max=transfer.shape[1] - 1)], is_mask.sum(1))
        chosen = select_to_unmask(strategy[idx], k_t, threshold[idx], eb_threshold[idx], is_mask, conf, ent)
        blocks[idx] = torch.where(chosen, token, current)
        unmasked_at[idx] = torch.where(chosen, step[idx, None], unmasked_at[idx])
        for a, r in ((a, int(idx[a])) for a in (~g).nonzero().squeeze(1).tolist()):
            probs = block_probs.setdefault(r, torch.zeros_like(draws[r]))
            probs[chosen[a]] = draws[r][chosen[a]]
        forwards[idx] += 1
        draft_len[idx] += query_lens - B  # the uncommitted tokens' KV is now in the cache
        has_prev[idx] = False
        step[idx] += 1
        first = False
        done = idx[~(blocks[idx] == mask_id).any(1)]  # requests whose block k finished
        if not len(done):
            continue
        out_tokens[done, k[done]] = blocks[done]
        out_labels[done, k[done]] = unmasked_at[done] + 1  # known tokens: -1 + 1 = 0
        for r in done.tolist():
            if r in out_probs:
                out_probs[r].append(block_probs.pop(r))
        k[done] += 1
        more = done[k[done] < num_blocks[done]]  # the finished block is committed by the next one's first forward
        prev_block[more], has_prev[more] = blocks[more], True
        blocks[more], unmasked_at[more], step[more] = mask_id, -1, 0
        active[done[k[done] >= num_blocks[done]]] = False
    for r, j in enumerate(jobs):
        K = int(num_blocks[r])
        j.tokens, j.labels = out_tokens[r, :K].flatten(), out_labels[r, :K].flatten()
        j.probs = torch.cat(out_probs[r]) if r in out_probs else None  # greedy: one-hot, built on demand
        j.forwards, j.draft_len = int(forwards[r]), int(draft_len[r])
