"""The SimSD draft model inside vLLM: the project's pure-PyTorch SDAR model (reference weights
and math) running batched over requests on its OWN paged KV cache, addressed through the
target's block tables (draft positions equal target positions, so no second KV-cache manager).

Draft KV layout: per layer one flat tensor [num_blocks * cache_block_size, kv_heads, head_dim]
for keys and one for values; slot(p) = block_table[p // cbs] * cbs + p % cbs, the target's
slot of the same position.

`draft_round` runs one SimSD draft round for every request of the step at once (reference:
`reference.simsd.draft_round`): each loop iteration is ONE batched draft forward over every
request still denoising (requests at different blocks / steps mixed), then the batched
denoising update (`denoise.select_to_unmask`, the reference's selection rules).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from vllm_dllm_spec.config import REMASKING_STRATEGIES, SimSDParams, SamplingKnobs
from vllm_dllm_spec.denoise import predict_greedy, select_to_unmask
from vllm_dllm_spec.reference.generate import exclude_mask_token, predict
from vllm_dllm_spec.reference.model import SDARModel, apply_rope, rope_cos_sin
from vllm_dllm_spec.region import cache_slots


class PagedDraftModel:
    """The draft's weights and paged KV cache on `device` (the runner's: a GPU on CUDA). Its
    forward returns the block logits on the host, where the draft's denoising policy runs."""

    def __init__(self, model: SDARModel, num_blocks: int, cache_block_size: int, device=None):
        self.device = torch.device(device or "cpu")
        self.model = model.to(self.device)
        cfg = model.config
        self.cbs = cache_block_size
        n = num_blocks * cache_block_size
        shape = (n, cfg.num_key_value_heads, cfg.head_dim)
        dtype = next(model.parameters()).dtype
        self.k = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(cfg.num_hidden_layers)]

    @torch.no_grad()
    def forward(self, tokens: list[torch.Tensor], first_pos: list[int], ctx_len: list[int],
                num_store: list[int], block_tables: list[torch.Tensor], block_length: int
                ) -> torch.Tensor:
        """One batched forward. Request r: query tokens[r] (its uncommitted tokens, then its
        block) at positions first_pos[r] + i, block-causal among themselves, every cached
        position < ctx_len[r] visible; the KV of its first num_store[r] query tokens is written
        to the cache. Returns the logits of every request's block, its last block_length query
        tokens: [R, block_length, V] (float32)."""
        cfg = self.model.config
        R, B = len(tokens), block_length
        n = torch.tensor([t.numel() for t in tokens])  # [R]
        T = int(n.max())
        C = max(1, max(ctx_len))
        ids = torch.nn.utils.rnn.pad_sequence(tokens, batch_first=True)  # [R, T]
        pos = torch.tensor(first_pos)[:, None] + torch.arange(T)  # [R, T]
        tables = torch.stack(block_tables).long()  # [R, max_blocks]
        qvalid = torch.arange(T)[None, :] < n[:, None]  # [R, T]
        ctx_pos = torch.arange(C).expand(R, C)  # [R, C]
        cvalid = ctx_pos < torch.tensor(ctx_len)[:, None]
        ctx_slots = cache_slots(tables, ctx_pos, self.cbs)  # [R, C] (invalid ones masked below)
        blocks = pos // B  # [R, T]
        qmask = (blocks[:, None, :] <= blocks[:, :, None]) & qvalid[:, None, :]  # [R, T, T]
        qmask |= torch.eye(T, dtype=torch.bool)[None]  # padded rows see themselves (no NaN)
        mask = torch.cat([cvalid[:, None, :].expand(R, T, C), qmask], dim=2)[:, None]  # [R, 1, T, C + T]
        srow, scol = (torch.arange(T)[None, :] < torch.tensor(num_store)[:, None]).nonzero(as_tuple=True)
        sslot = cache_slots(tables[srow], pos[srow, scol][:, None], self.cbs).squeeze(1)  # [S]
        block_cols = n[:, None] - B + torch.arange(B)  # [R, B] the block's query columns
        # the indices are built on the host (small); the forward runs on the draft's device
        dev = self.device
        ids, pos, mask, ctx_slots, block_cols = (t.to(dev) for t in (ids, pos, mask, ctx_slots, block_cols))
        srow, scol, sslot = srow.to(dev), scol.to(dev), sslot.to(dev)

        h, kvh, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        x = self.model.model.embed_tokens(ids)  # [R, T, hidden]
        cos, sin = rope_cos_sin(pos, d, cfg.rope_theta, x.dtype)
        for i, layer in enumerate(self.model.model.layers):
            attn = layer.self_attn
            y = layer.input_layernorm(x)
            q = attn.q_norm(attn.q_proj(y).view(R, T, h, d)).transpose(1, 2)  # [R, h, T, d]
            k = attn.k_norm(attn.k_proj(y).view(R, T, kvh, d)).transpose(1, 2)  # [R, kvh, T, d]
            v = attn.v_proj(y).view(R, T, kvh, d).transpose(1, 2)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            past_k = self.k[i][ctx_slots].transpose(1, 2)  # [R, kvh, C, d]
            past_v = self.v[i][ctx_slots].transpose(1, 2)
            if srow.numel():
                self.k[i][sslot] = k.transpose(1, 2)[srow, scol]
                self.v[i][sslot] = v.transpose(1, 2)[srow, scol]
            out = F.scaled_dot_product_attention(q, torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2),
                                                 attn_mask=mask, enable_gqa=True)  # [R, h, T, d]
            x = x + attn.o_proj(out.transpose(1, 2).reshape(R, T, h * d))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        x = x.gather(1, block_cols[..., None].expand(R, B, x.shape[-1]))  # [R, B, hidden]
        return self.model.lm_head(self.model.model.norm(x)).float().cpu()  # [R, B, V]


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


def draft_round(draft: PagedDraftModel, jobs: list[DraftJob], mask_id: int) -> None:
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
        j._block_start = block_start
    active = list(jobs)
    while active:
        starts = [j._block_start + j.k * B for j in active]
        logits = draft.forward(
            [torch.cat([j.uncommitted, j.block]) for j in active],
            [s - j.uncommitted.numel() for s, j in zip(starts, active)],
            [j.draft_len for j in active],
            [j.uncommitted.numel() for j in active],
            [j.block_table for j in active],
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
