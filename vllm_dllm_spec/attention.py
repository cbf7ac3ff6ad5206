"""Block-causal attention on vLLM's paged KV cache: one builder mixin over CPU_ATTN, FLASH_ATTN
and TRITON_ATTN.

Every forward of SDAR block diffusion is block-causal: a query token at position p sees every
key in blocks up to and including its own SDAR block (block = position // B). That covers the
block-causal prefill, the bidirectional in-block denoising step against the cached prefix, and
the fused commit (finished block + next block's first step in one forward).

All three kernels take a plain non-causal flag with a paged KV cache (CPU: `causal=False`; FA:
`flash_attn_varlen_func(..., causal=False)` attends keys [0, seqused_k); Triton
`unified_attention(causal=False)` masks key < seq_len). So the metadata builder splits every
request's query at SDAR block boundaries into "virtual requests", one per SDAR block, each with
seq_len = (position of its last token) + 1 and the parent's block-table row, and runs the kernel
non-causally: exactly block-causal attention (a run always ends at its block end or at the end
of the step: the in-progress block is scheduled whole and prompt chunks end at block ends). KV
is written by the usual `do_kv_cache_update` through the unchanged slot mapping.

The split is computed on the host from `query_start_loc_cpu` and `seq_lens_cpu_upper_bound`
(exact: custom_class speculation turns async scheduling off), so it needs no device sync.
`block_causal_segments` is its obviously-correct twin from token positions (tests compare them).
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as np
import torch
from vllm.v1.attention.backend import AttentionCGSupport, subclass_attention_backend
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

# vLLM backend names the split runs on (AttentionBackend.get_name())
SUPPORTED_BACKENDS = ("CPU_ATTN", "FLASH_ATTN", "TRITON_ATTN")


def block_causal_segments(
    query_start_loc: torch.Tensor,  # [num_reqs + 1] int32
    positions: torch.Tensor,  # [num_tokens] int64
    block_length: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split each request's query at SDAR block starts (from the tokens' positions).

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


def segments_from_lens(
    query_start_loc_cpu: torch.Tensor,  # [num_reqs + 1] int32
    seq_lens_cpu: torch.Tensor,  # [num_reqs] int32: computed + scheduled tokens
    block_length: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`block_causal_segments` from per-request lengths: request r's query is its last qlen[r]
    positions [seq_lens[r] - qlen[r], seq_lens[r]), so its segments are the SDAR blocks that range
    touches, clipped to it. Computed per segment in numpy (no per-token arrays, no torch op
    dispatch: it runs every step on the host)."""
    B = block_length
    qsl = query_start_loc_cpu.numpy().astype(np.int64)  # [R + 1]
    seq = seq_lens_cpu.numpy().astype(np.int64)  # [R]
    qlen = qsl[1:] - qsl[:-1]  # [R]
    first = seq - qlen  # [R] position of each request's first query token
    first_block = first // B
    n = np.where(qlen > 0, (seq - 1) // B - first_block + 1, 0)  # [R] segments per request
    parent = np.repeat(np.arange(len(qlen)), n)  # [S]
    block = first_block[parent] + np.arange(len(parent)) - (np.cumsum(n) - n)[parent]  # [S]
    seg_first = np.maximum(block * B, first[parent])  # [S] position of the segment's first token
    seg_lens = np.minimum((block + 1) * B, seq[parent])  # [S] its last position + 1
    seg_qsl = np.append(qsl[:-1][parent] + seg_first - first[parent], qsl[-1])  # [S + 1]
    return (torch.from_numpy(seg_qsl.astype(np.int32)), torch.from_numpy(seg_lens.astype(np.int32)),
            torch.from_numpy(parent))


def split_common_metadata(cm, block_length: int):
    """A CommonAttentionMetadata whose requests are the block-causal virtual requests of `cm`
    (non-causal). Token-level fields (slot mapping, positions, token count) are kept; per-request
    caches and fields the split would make stale are reset."""
    R = cm.num_reqs
    seg_qsl, seg_lens, parent = segments_from_lens(
        cm.query_start_loc_cpu[: R + 1], cm.seq_lens_cpu_upper_bound[:R], block_length)
    dev = cm.query_start_loc.device
    return dataclasses.replace(
        cm,
        query_start_loc=seg_qsl.to(dev, non_blocking=True),
        query_start_loc_cpu=seg_qsl,
        seq_lens=seg_lens.to(dev, non_blocking=True),
        seq_lens_cpu_upper_bound=seg_lens,
        num_reqs=int(seg_lens.shape[0]),
        max_query_len=int(np.diff(seg_qsl.numpy()).max()),
        max_seq_len=int(seg_lens.numpy().max()),
        block_table_tensor=cm.block_table_tensor.index_select(0, parent.to(dev, non_blocking=True)),  # [S, max_blocks]
        causal=False,
        is_prefilling=None,
        req_idx=None,
        mm_req_doc_ranges=None,
        rswa_prefix_lens=None,
        _num_computed_tokens_cache=None,
        _token_to_req_indices_cache=None,
    )


class BlockCausalBuilderMixin:
    """Mixed in before a backend's metadata builder: builds the metadata of the block-causal
    virtual requests instead of the step's requests."""

    # the virtual-request count varies step to step, so the builder never serves full CUDA
    # graphs (vLLM then falls back to PIECEWISE: attention runs eagerly); SDAR has one KV group,
    # so the runner never re-uses metadata through update_block_table
    supports_update_block_table = False

    @classmethod
    def get_cudagraph_support(cls, vllm_config, kv_cache_spec) -> AttentionCGSupport:
        return AttentionCGSupport.NEVER

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.block_length = int(vllm_config.model_config.hf_config.block_size)
        # a virtual request reads whole SDAR blocks through its parent's block table; the cache
        # block size can still change after the config hook (the platform picks it on CUDA)
        if kv_cache_spec.block_size % self.block_length:
            raise ValueError(
                f"the KV cache block size ({kv_cache_spec.block_size}) must be a multiple of the "
                f"SDAR block length ({self.block_length}); pass --block-size with such a value")

    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False):
        cm = common_attn_metadata
        if cm.num_actual_tokens == 0:
            return super().build(common_prefix_len, cm, fast_build)
        if cm.seq_lens_cpu_upper_bound is None:  # a caller without the host copy: read the device's
            cm = dataclasses.replace(cm, seq_lens_cpu_upper_bound=cm.seq_lens.cpu())
        # common_prefix_len 0: no cascade attention over virtual requests of one parent
        return super().build(0, split_common_metadata(cm, self.block_length), fast_build)


@functools.lru_cache(maxsize=None)
def create_block_causal_backend(base: type) -> type:
    """`base` (a vLLM attention backend class) with the block-causal builder mixed into its
    metadata builder. Raises ValueError for a backend the split is not known to be exact on."""
    name = base.get_name()
    if name not in SUPPORTED_BACKENDS:
        raise ValueError(
            f"SDAR block-causal attention runs on the {', '.join(SUPPORTED_BACKENDS)} attention "
            f"backends, got {name}; choose one with --attention-backend (attention_config.backend)")
    base_builder = base.get_builder_cls()
    builder = type(f"BlockCausal{base_builder.__name__}", (BlockCausalBuilderMixin, base_builder),
                   {"__module__": __name__})
    backend = subclass_attention_backend("BlockCausal", base, builder)
    backend.__module__ = __name__
    return backend


BlockCausalCPUAttentionBackend = create_block_causal_backend(CPUAttentionBackend)
