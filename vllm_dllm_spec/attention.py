"""Block-causal attention on vLLM's paged KV cache (CPU), with the fast CPU kernel.

Every forward of SDAR block diffusion is block-causal: a query token at position p sees every
key in blocks up to and including its own SDAR block (block = position // B). That covers the
block-causal prefill, the bidirectional in-block denoising step against the cached prefix, and
the fused commit (finished block + next block's first step in one forward).

The CPU kernel supports per-request bidirectional attention over the cached prefix (causal =
False). So the metadata builder splits every request's query at SDAR block boundaries into
"virtual requests", one per SDAR block, each with seq_len = (position of its last token) + 1 and
the parent's block-table row, and runs the kernel non-causally: exactly block-causal attention.
KV is written by the usual `do_kv_cache_update` through the unchanged slot mapping.
"""
from __future__ import annotations

import dataclasses

import torch
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)


def block_causal_segments(
    query_start_loc: torch.Tensor,  # [num_reqs + 1] int32
    positions: torch.Tensor,  # [num_tokens] int64
    block_length: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split each request's query at SDAR block starts.

    Returns (segment query_start_loc [S + 1] int32, segment seq_lens [S] int32,
    segment -> parent request [S] int64).
    """
    num_tokens = positions.shape[0]
    qsl = query_start_loc.long()
    is_start = torch.zeros(num_tokens, dtype=torch.bool)  # [num_tokens]
    is_start |= positions % block_length == 0
    req_starts = qsl[:-1][qsl[:-1] < qsl[1:]]  # first token of every non-empty request
    is_start[req_starts] = True
    seg_start = torch.nonzero(is_start).squeeze(-1)  # [S]
    seg_end = torch.cat([seg_start[1:], torch.tensor([num_tokens])])  # [S] exclusive
    seq_lens = positions[seg_end - 1] + 1  # [S]
    parent = torch.searchsorted(qsl[1:], seg_start, right=True)  # [S]
    seg_qsl = torch.cat([seg_start, torch.tensor([num_tokens])]).to(torch.int32)
    return seg_qsl, seq_lens.to(torch.int32), parent


class BlockCausalMetadataBuilder(CPUAttentionMetadataBuilder):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.block_length = int(vllm_config.model_config.hf_config.block_size)

    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False
              ) -> CPUAttentionMetadata:
        cm = common_attn_metadata
        n = cm.num_actual_tokens
        if cm.positions is None or n == 0:
            return super().build(common_prefix_len, cm, fast_build)
        num_reqs = cm.num_reqs
        positions = cm.positions[:n].long()  # [n]
        seg_qsl, seg_lens, parent = block_causal_segments(
            cm.query_start_loc_cpu[: num_reqs + 1], positions, self.block_length
        )
        num_segs = int(seg_lens.shape[0])
        seg_cm = dataclasses.replace(
            cm,
            query_start_loc=seg_qsl,
            query_start_loc_cpu=seg_qsl,
            seq_lens=seg_lens,
            num_reqs=num_segs,
            max_query_len=int((seg_qsl[1:] - seg_qsl[:-1]).max()),
            max_seq_len=int(seg_lens.max()),
            block_table_tensor=cm.block_table_tensor[parent],  # [S, max_blocks]
            causal=False,
        )
        return super().build(0, seg_cm, fast_build)


class BlockCausalCPUAttentionBackend(CPUAttentionBackend):
    @staticmethod
    def get_builder_cls():
        return BlockCausalMetadataBuilder
