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
from dataclasses import dataclass, field

import torch
from vllm.config import ModelConfig, VllmConfig
from vllm.config.vllm import get_layers_from_vllm_config
from vllm.forward_context import set_forward_context
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.model_loader import get_model
from vllm.v1.attention.backend import CommonAttentionMetadata

from vllm_dllm_spec.config import REMASKING_STRATEGIES, SimSDParams, SamplingKnobs
from vllm_dllm_spec.denoise import predict_greedy, select_to_unmask
from vllm_dllm_spec.reference.generate import exclude_mask_token, predict
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
    def forward(self, tokens: list[torch.Tensor], first_pos: torch.Tensor, block_tables: torch.Tensor,
                block_length: int) -> torch.Tensor:
        """One batched forward. Request r: query tokens[r] (its uncommitted tokens, then its
        block) at positions first_pos[r] + i, block-causal (the backend's split) over its cached
        positions < first_pos[r] and itself; vLLM writes the query's KV through the slots. Returns
        the logits of every request's block, its last block_length query tokens: [R, B, V] float32
        on the host."""
        R, B = len(tokens), block_length
        n = torch.tensor([t.numel() for t in tokens])  # [R]
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
            hidden = self.model(input_ids=torch.cat(tokens).to(dev), positions=pos_dev)  # [T, hidden]
        rows = (qsl[1:, None].long() - B + torch.arange(B)).flatten()  # [R * B] every block's rows
        logits = self.model.compute_logits(hidden[rows.to(dev)])  # [R * B, V]
        return logits.float().cpu().view(R, B, -1)


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
    probs: torch.Tensor | None = None  # [K * B, V] the draft's distributions (MRS)
    forwards: int = 0
    # loop state
    k: int = 0
    block: torch.Tensor | None = None
    unmasked_at: torch.Tensor | None = None
    step: int = 0
    uncommitted: torch.Tensor | None = None
    out_tokens: list = field(default_factory=list)
    out_labels: list = field(default_factory=list)
    out_probs: list = field(default_factory=list)
    block_probs: torch.Tensor | None = None


def draft_round(draft: VllmDraftModel, jobs: list[DraftJob], mask_id: int) -> None:
    """Batched twin of `reference.simsd.draft_round` for every job; updates job.draft_len to the
    draft cache length after the round (before the verification's truncation)."""
    if not jobs:
        return
    B = jobs[0].params.draft.block_length
    for j in jobs:
        block_start = j.seq.numel() // B * B
        j.uncommitted = j.seq[j.draft_len:block_start]
        j.block = torch.full((B,), mask_id, dtype=torch.long)
        known = j.seq[block_start:]
        j.block[: known.numel()] = known
        j.unmasked_at = torch.full((B,), -1, dtype=torch.long)
        j.step, j.k, j.forwards, j.block_probs = 0, 0, 0, None
        j.out_tokens, j.out_labels, j.out_probs = [], [], []
    active = list(jobs)
    while active:
        logits = draft.forward(
            [torch.cat([j.uncommitted, j.block]) for j in active],
            torch.tensor([j.draft_len for j in active]),  # the uncommitted tokens start there
            torch.stack([j.block_table for j in active]),
            B,
        )
        R = len(active)
        block_logits = exclude_mask_token(logits, mask_id)  # [R, B, V]
        V = block_logits.shape[-1]
        token = torch.zeros(R, B, dtype=torch.long)
        conf = torch.zeros(R, B)
        ent = torch.zeros(R, B)
        probs_rows: list[torch.Tensor | None] = [None] * R
        greedy = [j.knobs.temperature == 0.0 for j in active]
        gi = [r for r in range(R) if greedy[r]]
        if gi:
            t, c, e = predict_greedy(block_logits[gi].reshape(-1, V))
            token[gi], conf[gi], ent[gi] = t.view(-1, B), c.view(-1, B), e.view(-1, B)
        for r in range(R):
            if not greedy[r]:  # the reference's predict on the whole block (same random stream)
                t, c, e, p = predict(block_logits[r], active[r].knobs, active[r].generator)
                token[r], conf[r], ent[r], probs_rows[r] = t, c, e, p
        blocks = torch.stack([j.block for j in active])  # [R, B]
        is_mask = blocks == mask_id
        transfer = []
        for j in active:
            counts = j.params.draft.num_transfer_tokens()
            transfer.append(counts[j.step] if j.step < len(counts) else 1)
        k_t = torch.minimum(torch.tensor(transfer), is_mask.sum(1))
        chosen = select_to_unmask(
            torch.tensor([REMASKING_STRATEGIES.index(j.params.draft.remasking_strategy) for j in active]),
            k_t,
            torch.tensor([j.params.draft.confidence_threshold for j in active], dtype=torch.float32),
            torch.tensor([j.params.draft.eb_threshold for j in active], dtype=torch.float32),
            is_mask, conf, ent,
        )
        new_blocks = torch.where(chosen, token, blocks)
        still = []
        for r, j in enumerate(active):
            j.forwards += 1
            j.draft_len += j.uncommitted.numel()
            j.uncommitted = j.uncommitted[:0]
            j.block = new_blocks[r]
            j.unmasked_at = torch.where(chosen[r], j.step, j.unmasked_at)
            if not greedy[r]:
                if j.block_probs is None:
                    j.block_probs = torch.zeros_like(probs_rows[r])
                j.block_probs[chosen[r]] = probs_rows[r][chosen[r]]
            j.step += 1
            if bool((j.block == mask_id).any()):
                still.append(j)
                continue
            # block k finished
            j.out_tokens.append(j.block)
            j.out_labels.append(j.unmasked_at + 1)
            if greedy[r]:
                j.out_probs.append(None)
            else:
                j.out_probs.append(j.block_probs)
            j.k += 1
            if j.k < j.params.num_draft_blocks:
                j.uncommitted = j.block  # committed by the next draft block's first forward
                j.block = torch.full((B,), mask_id, dtype=torch.long)
                j.unmasked_at = torch.full((B,), -1, dtype=torch.long)
                j.step, j.block_probs = 0, None
                still.append(j)
            else:
                j.tokens = torch.cat(j.out_tokens)
                j.labels = torch.cat(j.out_labels)
                if greedy[r]:
                    j.probs = None  # one-hot of the tokens; built on demand
                else:
                    j.probs = torch.cat(j.out_probs)
        active = still
