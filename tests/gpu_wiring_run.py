"""Subprocess body of tests/test_vllm_gpu_wiring.py:
`python gpu_wiring_run.py {triton|flash} OUT.json [PART,...]` (parts: "checks" = kernel + backend,
or engine names; default all, so the slow interpreted-Triton engines can run in two processes).

Patches the process (tests/gpu_standins.py) so vLLM's real TRITON_ATTN (kernels interpreted) or
FLASH_ATTN (kernel stand-in) classes run on the CPU, then measures and writes JSON:
- "kernel" (triton): the block-causal split through vLLM's interpreted `unified_attention` and
  through the FA stand-in vs the dense block-causal reference; the stand-in vs the interpreted
  kernel, causal and non-causal;
- "backend": the wrapped backend's real builder + impl (KV written by the impl) vs the reference;
- "engines": the whole plugin engine (block diffusion B=4 and B=8, SimSD, PSD, Spiffy; prefix caching on,
  the batch run twice) vs each method's oracle: tokens, forwards, step_map / round records;
- "control" (flash): the same engine over the unwrapped (causal) backend, which must differ.
"""
from __future__ import annotations

import functools
import json
import os
import random
import sys
import tempfile
import time

BACKEND, OUT = sys.argv[1], sys.argv[2]
PARTS = sys.argv[3].split(",") if len(sys.argv) > 3 else None  # None: all
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gpu_standins  # noqa: E402

if BACKEND == "triton":
    gpu_standins.use_triton_interpreter()
elif BACKEND == "flash":
    gpu_standins.use_flash_standin()
else:
    raise SystemExit(f"backend must be 'triton' or 'flash', got {BACKEND!r}")

import torch  # noqa: E402

import vllm_dllm_spec.attention as attention  # noqa: E402
import vllm_dllm_spec.model as sdar_model  # noqa: E402

if BACKEND == "triton":
    import vllm.v1.attention.backends.triton_attn as kernel_module
    from vllm.v1.attention.backends.triton_attn import TritonAttentionBackend as BASE
    KERNEL_NAME = "unified_attention"
else:
    import vllm.v1.attention.backends.flash_attn as kernel_module
    from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend as BASE
    KERNEL_NAME = "flash_attn_varlen_func"

# count the kernel calls and the splits, so a result cannot come from another attention path
COUNTS = {"kernel": 0, "split": 0}
_kernel, _split = getattr(kernel_module, KERNEL_NAME), attention.split_common_metadata


def _counted_kernel(*args, **kwargs):
    COUNTS["kernel"] += 1
    return _kernel(*args, **kwargs)


def _counted_split(*args, **kwargs):
    COUNTS["split"] += 1
    return _split(*args, **kwargs)


setattr(kernel_module, KERNEL_NAME, _counted_kernel)
attention.split_common_metadata = _counted_split
RESULTS: dict = {}
H, HKV, D, CBS = 4, 2, 32, 16


def dense_reference(q, allk, allv, reqs, qsl, B):
    ref = torch.empty(q.shape, dtype=torch.float32)
    for r, (ctx, n) in enumerate(reqs):
        ref[qsl[r]:qsl[r + 1]] = gpu_standins.dense_block_causal(
            q[qsl[r]:qsl[r + 1]], allk[r], allv[r], torch.arange(ctx, ctx + n), B, D**-0.5)
    return ref


def random_step(B):
    """A step of 3 requests (fused commit after 8 cached; a 12-token prefill; one block after
    20 cached) with random q / k / v; returns everything the checks need."""
    torch.manual_seed(0)
    reqs = [(8, 8), (0, 12), (20, 4)]
    bt = torch.tensor([[1, 2, 0, 0], [3, 4, 0, 0], [5, 6, 0, 0]], dtype=torch.int32)
    allk = {r: torch.randn(c + n, HKV, D) for r, (c, n) in enumerate(reqs)}
    allv = {r: torch.randn(c + n, HKV, D) for r, (c, n) in enumerate(reqs)}
    qlens = torch.tensor([n for _, n in reqs])
    qsl = torch.cat([torch.zeros(1, dtype=torch.long), qlens.cumsum(0)]).int()
    seq_lens = torch.tensor([c + n for c, n in reqs], dtype=torch.int32)
    q = torch.randn(int(qsl[-1]), H, D)
    return reqs, bt, allk, allv, qsl, seq_lens, q


def check_kernels(B=4):
    """vLLM's interpreted unified_attention on the split vs dense; the FA stand-in likewise and
    against the interpreted kernel (the stand-in's anchor), causal and non-causal."""
    from vllm.v1.attention.ops.triton_unified_attention import unified_attention

    reqs, bt, allk, allv, qsl, seq_lens, q = random_step(B)
    k_cache, v_cache = torch.zeros(8, CBS, HKV, D), torch.zeros(8, CBS, HKV, D)
    for r, (c, n) in enumerate(reqs):
        pos = torch.arange(c + n)
        k_cache[bt[r, pos // CBS].long(), pos % CBS] = allk[r]
        v_cache[bt[r, pos // CBS].long(), pos % CBS] = allv[r]
    seg_qsl, seg_lens, parent = attention.segments_from_lens(qsl, seq_lens, B)
    common = dict(cu_seqlens_q=seg_qsl, max_seqlen_q=int((seg_qsl[1:] - seg_qsl[:-1]).max()), seqused_k=seg_lens,
                  max_seqlen_k=int(seg_lens.max()), softmax_scale=D**-0.5, causal=False,
                  block_table=bt[parent].contiguous())
    ref = dense_reference(q, allk, allv, reqs, qsl, B)
    tri = torch.empty_like(q)
    unified_attention(q=q, k=k_cache, v=v_cache, out=tri, window_size=(-1, -1), softcap=0,
                      q_descale=None, k_descale=None, v_descale=None, **common)
    fa = gpu_standins.flash_attn_varlen_func_ref(q, k_cache, v_cache, out=torch.empty_like(q), **common)
    anchor = {}
    for causal in (True, False):
        a, b = torch.empty_like(q), torch.empty_like(q)
        kw = dict(cu_seqlens_q=qsl, max_seqlen_q=int((qsl[1:] - qsl[:-1]).max()), seqused_k=seq_lens,
                  max_seqlen_k=int(seq_lens.max()), softmax_scale=D**-0.5, causal=causal, block_table=bt)
        unified_attention(q=q, k=k_cache, v=v_cache, out=a, window_size=(-1, -1), softcap=0,
                          q_descale=None, k_descale=None, v_descale=None, **kw)
        gpu_standins.flash_attn_varlen_func_ref(q, k_cache, v_cache, out=b, **kw)
        anchor[str(causal)] = (a - b).abs().max().item()
    unsplit = torch.empty_like(q)  # the plain causal kernel is NOT block-causal (the check can fail)
    unified_attention(q=q, k=k_cache, v=v_cache, out=unsplit, window_size=(-1, -1), softcap=0, q_descale=None,
                      k_descale=None, v_descale=None, **{**common, "cu_seqlens_q": qsl, "seqused_k": seq_lens,
                                                         "block_table": bt, "causal": True})
    RESULTS["kernel"] = {"triton_split_err": (tri - ref).abs().max().item(),
                         "standin_split_err": (fa - ref).abs().max().item(),
                         "standin_vs_triton": anchor, "unsplit_err": (unsplit - ref).abs().max().item(),
                         "segments": seg_qsl.tolist()}


def check_backend(B=4):
    """The wrapped backend's real builder and impl on one step vs the dense reference."""
    from vllm.config import set_current_vllm_config
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.attention.backend import AttentionCGSupport, CommonAttentionMetadata
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    import vllm_dllm_spec

    backend = attention.create_block_causal_backend(BASE)
    cfg = EngineArgs(model=vllm_dllm_spec.bundled_model_path(), dtype="float32", max_model_len=256,
                     enforce_eager=True, block_size=CBS).create_engine_config()
    spec = FullAttentionSpec(block_size=CBS, num_kv_heads=HKV, head_size=D, dtype=torch.float32)
    with set_current_vllm_config(cfg):
        builder = backend.get_builder_cls()(spec, ["layer.0"], cfg, torch.device("cpu"))
        impl = backend.get_impl_cls()(H, D, D**-0.5, HKV, None, None, "auto")
    reqs, bt, allk, allv, qsl, seq_lens, q = random_step(B)
    layer = type("Layer", (), {})()
    layer._k_scale = layer._v_scale = layer._q_scale = torch.tensor(1.0)
    kv_cache = torch.zeros(8, HKV, CBS, 2 * D)  # FA / Triton layout [blocks, kv_heads, block, 2 * head]

    def slots(r, a, b):
        p = torch.arange(a, b)
        return bt[r, p // CBS].long() * CBS + p % CBS

    for r, (c, n) in enumerate(reqs):  # the cached prefix, written by the impl's own KV write
        if c:
            impl.do_kv_cache_update(layer, allk[r][:c], allv[r][:c], kv_cache, slots(r, 0, c))
    slot = torch.cat([slots(r, c, c + n) for r, (c, n) in enumerate(reqs)])
    key = torch.cat([allk[r][c:] for r, (c, n) in enumerate(reqs)])
    val = torch.cat([allv[r][c:] for r, (c, n) in enumerate(reqs)])
    cm = CommonAttentionMetadata(
        query_start_loc=qsl, query_start_loc_cpu=qsl, seq_lens=seq_lens, num_reqs=3,
        num_actual_tokens=int(qsl[-1]), max_query_len=12, max_seq_len=int(seq_lens.max()),
        block_table_tensor=bt, slot_mapping=slot, causal=True, seq_lens_cpu_upper_bound=seq_lens)
    md = builder.build(0, cm)
    impl.do_kv_cache_update(layer, key, val, kv_cache, slot)  # vLLM writes the step's KV first
    out = torch.zeros_like(q)
    impl.forward(layer, q, key, val, kv_cache, md, out)
    RESULTS["backend"] = {
        "err": (out - dense_reference(q, allk, allv, reqs, qsl, B)).abs().max().item(),
        "causal": bool(md.causal), "num_segments": int(md.query_start_loc.shape[0] - 1),
        "cudagraph_never": builder.get_cudagraph_support(cfg, spec) == AttentionCGSupport.NEVER,
        "name": backend.get_name()}


PROMPT_LENGTHS = [1, 5, 9, 17]  # < B, mid-block, a multiple of neither, a long prefill
MAX_TOKENS = [6, 9, 5, 8]
CONFIGS = [{"remasking_strategy": "sequential"},
           {"remasking_strategy": "low_confidence_static", "denoising_steps": 2},
           {"remasking_strategy": "low_confidence_dynamic", "confidence_threshold": 0.3},
           {"remasking_strategy": "entropy_bounded", "eb_threshold": 2.0}]


def run_engine(path, options, backend):
    """One engine over `backend`: the batch twice (the second run hits the prefix cache)."""
    from vllm import LLM, SamplingParams

    from vllm_dllm_spec.testing import shutdown_llm

    sdar_model.block_attention_backend = lambda *a, **k: backend
    vocab = reference_model(path).config.vocab_size
    rng = random.Random(0)
    prompts = [[rng.randrange(2, vocab) for _ in range(n)] for n in PROMPT_LENGTHS]
    llm = LLM(model=path, dtype="float32", max_model_len=128, enforce_eager=True, max_num_seqs=4,
              block_size=CBS, enable_prefix_caching=True, seed=0, additional_config={"dllm_spec": options})
    sps = [SamplingParams(max_tokens=m, temperature=0.0, extra_args=c) for c, m in zip(CONFIGS, MAX_TOKENS)]
    runs, cached = [], []
    for _ in range(2):
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sps, use_tqdm=False)
        runs.append([(list(o.outputs[0].token_ids), o.kv_transfer_params["dllm_spec"]) for o in outs])
        cached.append(sum(o.num_cached_tokens or 0 for o in outs))  # prompt tokens read from the cache
    shutdown_llm(llm)
    return prompts, runs, cached


@functools.lru_cache(maxsize=None)
def reference_model(path):
    from vllm_dllm_spec.reference import SDARModel

    return SDARModel.from_pretrained(path)


def oracle(method, path, prompt, config, max_tokens, options):
    """(tokens, forwards, per-step record) of the method's pure-PyTorch oracle."""
    from vllm_dllm_spec.reference import generate
    from vllm_dllm_spec.reference.psd import psd_generate
    from vllm_dllm_spec.reference.simsd import simsd_generate
    from vllm_dllm_spec.reference.spiffy import spiffy_generate

    model = reference_model(path)
    if method == "block_diffusion":
        r = generate(model, prompt, gen_length=max_tokens, fuse_commit=True, **config)
        return r.tokens, r.num_forwards, r.step_map
    if method == "psd":
        r = psd_generate(model, prompt, gen_length=max_tokens, draft_depth=options["draft_depth"], **config)
        return r.tokens, r.num_forwards, r.step_map
    if method == "spiffy":
        r = spiffy_generate(model, prompt, gen_length=max_tokens, graph=options["draft_graph"],
                            graph_budget=options["graph_budget"], **config)
        return r.tokens, r.num_forwards, r.step_map
    names = {"remasking_strategy": "draft_remasking_strategy", "denoising_steps": "draft_denoising_steps"}
    r = simsd_generate(model, None, prompt, gen_length=max_tokens, num_draft_blocks=options["num_draft_blocks"],
                       **{names.get(k, k): v for k, v in config.items()})
    return r.tokens, r.target_forwards, [r.draft_forwards, r.accepted_per_round]


def engine_record(method, tokens, rec):
    if method == "simsd":
        return tokens, rec["target_forwards"], [rec["draft_forwards"], rec["accepted_per_round"]]
    return tokens, rec["num_forwards"], rec["step_map"]


def check_engine(name, path, options, backend):
    t0, before = time.time(), dict(COUNTS)
    prompts, runs, cached = run_engine(path, options, backend)
    method = options["method"]
    want = [oracle(method, path, p, c, m, options) for p, c, m in zip(prompts, CONFIGS, MAX_TOKENS)]
    mismatches = [[run, i, engine_record(method, *got), list(want[i])]
                  for run, outs in enumerate(runs) for i, got in enumerate(outs)
                  if list(engine_record(method, *got)) != list(want[i])]
    RESULTS.setdefault("engines", {})[name] = {
        "mismatches": mismatches, "requests": len(prompts) * len(runs), "cached_tokens": cached,
        "kernel_calls": COUNTS["kernel"] - before["kernel"], "splits": COUNTS["split"] - before["split"],
        "seconds": round(time.time() - t0, 1)}


def wanted(part: str) -> bool:
    return PARTS is None or part in PARTS


def main():
    from vllm_dllm_spec.reference.spiffy import DraftGraph
    from vllm_dllm_spec.testing import make_random_sdar_checkpoint

    t0 = time.time()
    if wanted("checks"):
        if BACKEND == "triton":
            check_kernels()
        check_backend()
    tmp = tempfile.mkdtemp(prefix="gpu_wiring_")
    b4 = make_random_sdar_checkpoint(os.path.join(tmp, "b4"), seed=0)
    b8 = make_random_sdar_checkpoint(os.path.join(tmp, "b8"), block_size=8, seed=2)
    graph = os.path.join(tmp, "graph_b4.json")  # branching over positions and tokens, one multi-parent state
    DraftGraph((((1, 1),), ((2, 1),), ((1, 2),), ((1, 1), (2, 1))), 4, {"kind": "gpu wiring"}).to_json(graph)
    wrapped = attention.create_block_causal_backend(BASE)
    engines = {
        "block_diffusion_b4": (b4, {"method": "block_diffusion"}, wrapped),
        "block_diffusion_b8": (b8, {"method": "block_diffusion"}, wrapped),
        "simsd": (b4, {"method": "simsd", "num_draft_blocks": 2}, wrapped),
        "psd": (b4, {"method": "psd", "draft_depth": 2}, wrapped),
        "spiffy": (b4, {"method": "spiffy", "draft_graph": graph, "graph_budget": 4}, wrapped),
    }
    if BACKEND == "flash":  # negative control: the causal backend as vLLM ships it
        engines["control_unsplit"] = (b4, {"method": "block_diffusion"}, BASE)
    for name, (path, options, backend) in engines.items():
        if wanted(name):
            check_engine(name, path, options, backend)
    RESULTS["seconds"] = round(time.time() - t0, 1)
    with open(OUT, "w") as f:
        json.dump(RESULTS, f)

main()
