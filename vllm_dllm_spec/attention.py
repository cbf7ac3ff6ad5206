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

Verify regions (SimSD / PSD / Spiffy, `region.py`): a request's region is a suffix of its query
whose rows `ops.region_attention` recomputes and overwrites after the kernel. The split also cuts
at the region's first token, and every segment of the region gets seq_len = its own query length:
a valid non-causal request reading only that many keys (qlen x qlen instead of qlen x prefix;
its output is overwritten). The step's region starts come from the layouts the runner publishes
(`region.CURRENT`, their `region_start` on the host), read only by builders whose layers all
carry the region fix-up (the SimSD draft's builders never do).
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as np
import torch
from vllm.v1.attention.backend import AttentionCGSupport, subclass_attention_backend
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

from vllm_dllm_spec import region

# vLLM backend names the split runs on (AttentionBackend.get_name())
SUPPORTED_BACKENDS = ("CPU_ATTN", "FLASH_ATTN", "TRITON_ATTN")


def block_causal_segments(
    query_start_loc: torch.Tensor,  # [num_reqs + 1] int32
    positions: torch.Tensor,  # [num_tokens] int64
    block_length: int,
    region_start: torch.Tensor | None = None,  # [num_reqs] flat index of each request's first region token
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split each request's query at SDAR block starts (from the tokens' positions) and at its
    region start (a query end: no region); a segment inside a region reads only its own length.

    Returns (segment query_start_loc [S + 1] int32, segment seq_lens [S] int32,
    segment -> parent request [S] int64).
    """
    num_tokens = positions.shape[0]
    qsl = query_start_loc.long()
    is_start = torch.zeros(num_tokens + 1, dtype=torch.bool)  # [num_tokens + 1]: a spare slot for query ends
    is_start[:num_tokens] |= positions % block_length == 0
    req_starts = qsl[:-1][qsl[:-1] < qsl[1:]]  # first token of every non-empty request
    is_start[req_starts] = True
    in_region = torch.zeros(num_tokens, dtype=torch.bool)  # [num_tokens]
    if region_start is not None:
        is_start[region_start.long()] = True
        for r in range(len(region_start)):
            in_region[int(region_start[r]):int(qsl[r + 1])] = True
    is_start = is_start[:num_tokens]
    seg_start = torch.nonzero(is_start).squeeze(-1)  # [S]
    seg_end = torch.cat([seg_start[1:], torch.tensor([num_tokens])])  # [S] exclusive
    seq_lens = torch.where(in_region[seg_start], seg_end - seg_start, positions[seg_end - 1] + 1)  # [S]
    parent = torch.searchsorted(qsl[1:], seg_start, right=True)  # [S]
    seg_qsl = torch.cat([seg_start, torch.tensor([num_tokens])]).to(torch.int32)
    return seg_qsl, seq_lens.to(torch.int32), parent


def segments_from_lens(
    query_start_loc_cpu: torch.Tensor,  # [num_reqs + 1] int32
    seq_lens_cpu: torch.Tensor,  # [num_reqs] int32: computed + scheduled tokens
    block_length: int,
    region_start: np.ndarray | None = None,  # [num_reqs] flat index of each request's first region token
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`block_causal_segments` from per-request lengths. With regions, request r is first cut in
    two at region_start[r] (its rows before the region, then its region) and each part is split
    on its own; a region segment's seq_len is its own query length."""
    qsl = query_start_loc_cpu.numpy().astype(np.int64)  # [R + 1]
    seq = seq_lens_cpu.numpy().astype(np.int64)  # [R]
    if region_start is None:
        seg_qsl, seg_lens, parent = _split_requests(qsl, seq, block_length)
    else:
        cut = np.asarray(region_start, dtype=np.int64)  # [R]
        halves_qsl = np.append(np.stack([qsl[:-1], cut], 1).reshape(-1), qsl[-1])  # [2R + 1]
        halves_seq = np.stack([seq - (qsl[1:] - cut), seq], 1).reshape(-1)  # [2R]
        seg_qsl, seg_lens, half = _split_requests(halves_qsl, halves_seq, block_length)
        in_region = half % 2 == 1  # [S]
        seg_lens = np.where(in_region, np.diff(seg_qsl), seg_lens)
        parent = half // 2
    return (torch.from_numpy(seg_qsl.astype(np.int32)), torch.from_numpy(seg_lens.astype(np.int32)),
            torch.from_numpy(parent))


def _split_requests(qsl: np.ndarray, seq: np.ndarray, B: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Request r's query is its last qlen[r] positions [seq[r] - qlen[r], seq[r]), so its segments
    are the SDAR blocks that range touches, clipped to it. Computed per segment in numpy (no
    per-token arrays, no torch op dispatch: it runs every step on the host).
    qsl [R + 1], seq [R] int64 -> (segment qsl [S + 1], seq_lens [S], parent [S])."""
    qlen = qsl[1:] - qsl[:-1]  # [R]
    first = seq - qlen  # [R] position of each request's first query token
    first_block = first // B
    n = np.where(qlen > 0, (seq - 1) // B - first_block + 1, 0)  # [R] segments per request
    parent = np.repeat(np.arange(len(qlen)), n)  # [S]
    block = first_block[parent] + np.arange(len(parent)) - (np.cumsum(n) - n)[parent]  # [S]
    seg_first = np.maximum(block * B, first[parent])  # [S] position of the segment's first token
    seg_lens = np.minimum((block + 1) * B, seq[parent])  # [S] its last position + 1
    seg_qsl = np.append(qsl[:-1][parent] + seg_first - first[parent], qsl[-1])  # [S + 1]
    return seg_qsl, seg_lens, parent


def split_common_metadata(cm, block_length: int, region_start: np.ndarray | None = None):
    """A CommonAttentionMetadata whose requests are the block-causal virtual requests of `cm`
    (non-causal; region rows from region_start [num_reqs] on read only themselves). Token-level
    fields (slot mapping, positions, token count) are kept; per-request caches and fields the
    split would make stale are reset."""
    R = cm.num_reqs
    seg_qsl, seg_lens, parent = segments_from_lens(
        cm.query_start_loc_cpu[: R + 1], cm.seq_lens_cpu_upper_bound[:R], block_length, region_start)
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
        return super().build(0, split_common_metadata(cm, self.block_length, self._region_start(cm)), fast_build)

    def _region_start(self, cm) -> np.ndarray | None:
        """[num_reqs] flat index of each request's first verify-region token (its query end: no
        region) from the layouts the runner published for this step; None unless every layer
        of this builder overwrites the region rows (the SimSD draft's layers do not)."""
        if not region.CURRENT:
            return None
        layers = self.vllm_config.compilation_config.static_forward_context
        if not all(isinstance(getattr(layers.get(name), "impl", None), region.RegionAttentionMixin)
                   for name in self.layer_names):
            return None
        return region.query_region_starts(region.CURRENT, cm.query_start_loc_cpu[: cm.num_reqs + 1].numpy())


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
