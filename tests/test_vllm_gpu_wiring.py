"""The GPU path, tested on CPU through vLLM's real GPU attention classes (issue 14).

- Pure functions: the host-side split (`segments_from_lens`) equals its position-based twin.
- In subprocesses (the stand-ins patch process-wide state; tests/gpu_wiring_run.py): the split
  through vLLM's interpreted Triton kernel and through the FA stand-in against a dense
  block-causal reference (the stand-in anchored to the interpreted kernel, causal and not); the
  real TRITON_ATTN / FLASH_ATTN builder + impl; the whole plugin engine through each (block
  diffusion B=4 and B=8, SimSD, PSD, prefix caching on) equal to the oracles; an unsplit control
  that differs. The subprocesses (Triton's engines split over two) run at once, started by a
  module fixture.
- The config hook with the platform patched to CUDA: worker choice, CUDA-graph mode, refused
  backends / full graphs / context parallelism, cache block-size pinning; the CUDA branch of
  `model.block_attention_backend`; the builder's block-size guard.
"""
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from tolerances import TOLERANCES  # noqa: E402

FP32_ATOL = TOLERANCES[torch.float32]["atol"]  # kernels vs the dense reference (max abs error)

RUNNER = Path(__file__).resolve().parent / "gpu_wiring_run.py"
SUBPROCESS_TIMEOUT = 900


# -- pure functions ----------------------------------------------------------------------------
def test_host_split_equals_position_split():
    from vllm_dllm_spec.attention import block_causal_segments, segments_from_lens

    rng = random.Random(0)
    for _ in range(100):
        B = rng.choice([1, 2, 4, 8, 16])
        n = rng.randint(1, 6)
        ctx = [rng.choice([rng.randint(0, 60), rng.randint(0, 8) * B]) for _ in range(n)]
        qlen = [rng.randint(0, 40) for _ in range(n)]  # an empty query too
        qlen[rng.randrange(n)] = rng.randint(1, 40)  # the builder never splits an empty step
        qsl = torch.tensor([0] + torch.tensor(qlen).cumsum(0).tolist(), dtype=torch.int32)
        seq_lens = torch.tensor([c + q for c, q in zip(ctx, qlen)], dtype=torch.int32)
        positions = torch.cat([torch.arange(c, c + q) for c, q in zip(ctx, qlen)])
        want = block_causal_segments(qsl, positions, B)
        got = segments_from_lens(qsl, seq_lens, B)
        for a, b in zip(got, want):
            assert torch.equal(a, b)


def test_host_split_with_regions_equals_position_split():
    """Regions (suffixes of some requests' queries, starting anywhere in a block): the host split
    cuts at each region start and gives its segments seq_len = their own length, as the twin."""
    from vllm_dllm_spec.attention import block_causal_segments, segments_from_lens

    rng = random.Random(1)
    for _ in range(200):
        B = rng.choice([1, 2, 4, 8])
        n = rng.randint(1, 6)
        ctx = [rng.choice([rng.randint(0, 60), rng.randint(0, 8) * B]) for _ in range(n)]
        qlen = [rng.randint(0, 30) for _ in range(n)]
        qlen[rng.randrange(n)] = rng.randint(1, 30)
        qsl = torch.tensor([0] + torch.tensor(qlen).cumsum(0).tolist(), dtype=torch.int32)
        seq_lens = torch.tensor([c + q for c, q in zip(ctx, qlen)], dtype=torch.int32)
        positions = torch.cat([torch.arange(c, c + q) for c, q in zip(ctx, qlen)])
        # region length per request: none (0), all of the query, or a random suffix
        rlen = [rng.choice([0, q, rng.randint(0, q)]) for q in qlen]
        start = qsl[1:] - torch.tensor(rlen, dtype=torch.int32)
        want = block_causal_segments(qsl, positions, B, start)
        got = segments_from_lens(qsl, seq_lens, B, start.numpy())
        for a, b in zip(got, want):
            assert torch.equal(a, b)
        seg_qsl, seg_lens, parent = got
        in_region = seg_qsl[:-1] >= start[parent]
        assert torch.equal(seg_lens[in_region], (seg_qsl[1:] - seg_qsl[:-1])[in_region])
        assert (seg_lens >= seg_qsl[1:] - seg_qsl[:-1]).all()  # a valid non-causal request each


def test_query_region_starts():
    from vllm_dllm_spec import region

    qsl = np.array([0, 8, 14, 30])
    idx = torch.tensor([[2, 3, 4, 5, 6, 7], [24, 25, 26, 27, 28, 29]])  # requests 0 and 2
    lay = region.block_copies_layout(idx, torch.zeros((2, 4), dtype=torch.int64), torch.tensor([4, 16]), 3, 2)
    assert lay.to("cpu").region_start.tolist() == [2, 24]
    assert region.query_region_starts([lay], qsl).tolist() == [2, 14, 24]
    with pytest.raises(RuntimeError, match="not suffixes"):  # region 0 stops short of its query end
        region.query_region_starts([lay], np.array([0, 9, 14, 30]))
    # regions of different lengths (PSD / Spiffy: the live copies only): one layout per length
    one = region.block_copies_layout(torch.tensor([[28, 29]]), torch.zeros((1, 4), dtype=torch.int64),
                                     torch.tensor([16]), 1, 2)
    three = region.block_copies_layout(idx[:1], torch.zeros((1, 4), dtype=torch.int64), torch.tensor([4]), 3, 2)
    assert region.query_region_starts([one, three], qsl).tolist() == [2, 14, 28]
    with pytest.raises(RuntimeError, match="not suffixes"):  # two regions in one request
        region.query_region_starts([lay, one], qsl)
    with pytest.raises(ValueError, match="consecutive"):
        region.block_copies_layout(idx.flip(1), torch.zeros((2, 4), dtype=torch.int64), torch.tensor([4, 16]), 3, 2)


def test_split_metadata_fields():
    from vllm.v1.attention.backend import CommonAttentionMetadata

    from vllm_dllm_spec.attention import split_common_metadata

    # r0: fused commit at 8 (8 tokens), r1: a 6-token prefill, r2: one block after 20
    qsl = torch.tensor([0, 8, 14, 18], dtype=torch.int32)
    seq_lens = torch.tensor([16, 6, 24], dtype=torch.int32)
    bt = torch.arange(12, dtype=torch.int32).view(3, 4)
    cm = CommonAttentionMetadata(
        query_start_loc=qsl, query_start_loc_cpu=qsl, seq_lens=seq_lens, num_reqs=3, num_actual_tokens=18,
        max_query_len=8, max_seq_len=24, block_table_tensor=bt, slot_mapping=torch.arange(18),
        causal=True, seq_lens_cpu_upper_bound=seq_lens, positions=torch.arange(18),
        _num_computed_tokens_cache=torch.zeros(3))
    s = split_common_metadata(cm, 4)
    assert s.query_start_loc_cpu.tolist() == [0, 4, 8, 12, 14, 18]
    assert s.seq_lens.tolist() == s.seq_lens_cpu_upper_bound.tolist() == [12, 16, 4, 6, 24]
    assert torch.equal(s.block_table_tensor, bt[torch.tensor([0, 0, 1, 1, 2])])
    assert (s.num_reqs, s.max_query_len, s.max_seq_len, s.causal) == (5, 4, 24, False)
    assert s._num_computed_tokens_cache is None and s.is_prefilling is None
    assert s.slot_mapping is cm.slot_mapping and s.num_actual_tokens == 18  # KV lands where it did
    # r0's last block and r2's block are verify regions: they read only themselves
    s = split_common_metadata(cm, 4, np.array([4, 14, 14]))
    assert s.query_start_loc_cpu.tolist() == [0, 4, 8, 12, 14, 18]
    assert s.seq_lens.tolist() == s.seq_lens_cpu_upper_bound.tolist() == [12, 4, 4, 6, 4]
    assert (s.num_reqs, s.max_query_len, s.max_seq_len) == (5, 4, 12)


# -- real GPU backend classes on CPU (subprocesses) ---------------------------------------------
# (backend, parts): the interpreted Triton kernel is slow, so its engines are split over two
# processes; the three run at once, one thread each
RUNS = [("triton", "checks,block_diffusion_b4,block_diffusion_b8,simsd"), ("triton", "psd,spiffy"), ("flash", "all")]


@pytest.fixture(scope="module")
def wiring(tmp_path_factory):
    """The subprocesses at once; {backend: results merged over its runs}."""
    out = tmp_path_factory.mktemp("gpu_wiring")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = []
    for i, (backend, parts) in enumerate(RUNS):
        args = [sys.executable, str(RUNNER), backend, str(out / f"{i}.json")] + ([] if parts == "all" else [parts])
        procs.append((i, backend, subprocess.Popen(args, env=env, stdout=open(out / f"{i}.log", "w"),
                                                   stderr=subprocess.STDOUT)))
    results: dict[str, dict] = {}
    for i, backend, p in procs:
        rc = p.wait(timeout=SUBPROCESS_TIMEOUT)
        log = (out / f"{i}.log").read_text()
        assert rc == 0, f"{backend} subprocess {i} failed (rc {rc}):\n{log[-6000:]}"
        run = json.loads((out / f"{i}.json").read_text())
        merged = results.setdefault(backend, {"engines": {}})
        merged["engines"].update(run.pop("engines", {}))
        merged.update(run)
    return results


def test_interpreted_triton_kernel_on_the_split(wiring):
    k = wiring["triton"]["kernel"]
    assert k["segments"] == [0, 4, 8, 12, 16, 20, 24]  # fused commit 2, prefill 3, block 1
    assert k["triton_split_err"] <= FP32_ATOL
    assert k["standin_split_err"] <= FP32_ATOL
    assert k["unsplit_err"] > 0.1  # the causal kernel alone is not block-causal
    for causal in ("True", "False"):  # the FA stand-in is anchored to vLLM's kernel
        assert k["standin_vs_triton"][causal] <= FP32_ATOL


@pytest.mark.parametrize("backend", ["triton", "flash"])
def test_real_builder_and_impl(wiring, backend):
    r = wiring[backend]["backend"]
    assert r["name"] == {"triton": "TRITON_ATTN", "flash": "FLASH_ATTN"}[backend]
    assert r["err"] <= FP32_ATOL and r["causal"] is False and r["num_segments"] == 6
    assert r["cudagraph_never"]


@pytest.mark.parametrize("backend", ["triton", "flash"])
@pytest.mark.parametrize("case", ["block_diffusion_b4", "block_diffusion_b8", "simsd", "psd", "spiffy"])
def test_engine_equals_oracle(wiring, backend, case):
    r = wiring[backend]["engines"][case]
    assert r["requests"] == 8  # 4 prompts, twice
    assert r["cached_tokens"][1] > r["cached_tokens"][0]  # the second run hits the prefix cache
    assert r["kernel_calls"] > 0 and r["splits"] > 0, "the engine must run the GPU backend's kernel"
    assert not r["mismatches"], "\n".join(map(str, r["mismatches"]))


def test_unsplit_control_differs(wiring):
    r = wiring["flash"]["engines"]["control_unsplit"]
    assert r["kernel_calls"] > 0 and r["splits"] == 0
    assert r["mismatches"], "causal attention must not reproduce block-causal SDAR decoding"


# -- the config hook on CUDA (platform patched) --------------------------------------------------
class FakeCuda:
    device_name = "cuda"

    def is_cpu(self):
        return False

    def is_cuda(self):
        return True


def cpu_config(path, options=None, **kw):
    from vllm.engine.arg_utils import EngineArgs

    additional = {} if options is None else {"dllm_spec": options}
    kw.setdefault("enforce_eager", True)
    return EngineArgs(model=path, dtype="float32", max_model_len=256, additional_config=additional,
                      **kw).create_engine_config()


def on_cuda(cfg, monkeypatch, *, cudagraph_mode=None, eager=False, block_size=None):
    """Re-runs the config hook on `cfg` as vLLM would on CUDA, before the platform fills the
    unset fields."""
    import vllm.platforms

    from vllm_dllm_spec.vllm_hooks import configure

    cfg.parallel_config.worker_cls = "auto"
    cfg.model_config.enforce_eager = eager
    cfg.compilation_config.cudagraph_mode = cudagraph_mode
    cfg.cache_config.block_size = block_size
    cfg.cache_config.user_specified_block_size = block_size is not None
    with monkeypatch.context() as m:  # only the hook sees CUDA (building a config needs the real one)
        m.setattr(vllm.platforms, "current_platform", FakeCuda())
        configure(cfg)
    return cfg


@pytest.mark.parametrize("method, worker", [
    ("block_diffusion", "vllm_dllm_spec.worker.DLLMGPUWorker"),
    ("simsd", "vllm_dllm_spec.simsd.runner.SimSDGPUWorker"),
    ("psd", "vllm_dllm_spec.psd.runner.PSDGPUWorker"),
    ("spiffy", "vllm_dllm_spec.spiffy.runner.SpiffyGPUWorker"),
])
def test_cuda_worker_and_graph_mode(tiny_ckpt, monkeypatch, tmp_path, method, worker):
    from vllm.config import CUDAGraphMode

    from vllm_dllm_spec.reference.spiffy import DraftGraph

    import importlib

    from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.gpu_worker import Worker

    options = {"method": method}
    if method == "spiffy":  # the random checkpoint ships no default graph
        options["draft_graph"] = str(tmp_path / "graph.json")
        DraftGraph((((1, 1),),), 4, {}).to_json(options["draft_graph"])
    cfg = on_cuda(cpu_config(tiny_ckpt, options), monkeypatch)
    assert cfg.parallel_config.worker_cls == worker
    module, name = worker.rsplit(".", 1)
    worker_cls = getattr(importlib.import_module(module), name)  # the GPU worker and its V1 GPU runner
    assert issubclass(worker_cls, Worker) and issubclass(worker_cls.runner_cls, GPUModelRunner)
    assert not issubclass(worker_cls.runner_cls, CPUModelRunner)
    assert cfg.compilation_config.cudagraph_mode == CUDAGraphMode.PIECEWISE
    assert cfg.attention_config.use_non_causal
    assert cfg.cache_config.block_size is None  # B = 4 divides 16: the platform's choice stands
    eager = on_cuda(cpu_config(tiny_ckpt, options), monkeypatch, eager=True)
    assert eager.compilation_config.cudagraph_mode is None  # vLLM turns it to NONE under eager
    piecewise = on_cuda(cpu_config(tiny_ckpt), monkeypatch, cudagraph_mode=CUDAGraphMode.NONE)
    assert piecewise.compilation_config.cudagraph_mode == CUDAGraphMode.NONE  # the user's choice


def test_cpu_keeps_the_cpu_worker(tiny_ckpt):
    assert cpu_config(tiny_ckpt, {"method": "psd"}).parallel_config.worker_cls == "vllm_dllm_spec.psd.runner.PSDWorker"


@pytest.mark.parametrize("mode", ["FULL", "FULL_AND_PIECEWISE", "FULL_DECODE_ONLY"])
def test_full_cuda_graphs_are_refused(tiny_ckpt, monkeypatch, mode):
    from vllm.config import CUDAGraphMode

    with pytest.raises(ValueError, match=f"cudagraph_mode {mode} is not supported.*PIECEWISE or NONE"):
        on_cuda(cpu_config(tiny_ckpt), monkeypatch, cudagraph_mode=CUDAGraphMode[mode])


@pytest.mark.parametrize("backend", ["FLASHINFER", "FLEX_ATTENTION"])
def test_other_attention_backends_are_refused(tiny_ckpt, monkeypatch, backend):
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    cfg = cpu_config(tiny_ckpt)
    cfg.attention_config.backend = AttentionBackendEnum[backend]
    with pytest.raises(ValueError, match=f"attention backend {backend} cannot run.*FLASH_ATTN or TRITON_ATTN"):
        on_cuda(cfg, monkeypatch)


def test_context_parallelism_is_refused(tiny_ckpt, monkeypatch):
    cfg = cpu_config(tiny_ckpt)
    cfg.parallel_config.decode_context_parallel_size = 2
    with pytest.raises(ValueError, match="decode_context_parallel_size must be 1"):
        on_cuda(cfg, monkeypatch)


@pytest.mark.parametrize("B, pinned", [(32, 32), (64, 64), (8, None)])
def test_cache_block_size_pinned_for_large_blocks(tmp_path, monkeypatch, B, pinned):
    from vllm_dllm_spec.testing import make_random_sdar_checkpoint

    path = make_random_sdar_checkpoint(tmp_path / f"b{B}", block_size=B)
    cfg = on_cuda(cpu_config(path, block_size=B), monkeypatch)
    assert cfg.cache_config.block_size == pinned
    assert cfg.cache_config.user_specified_block_size == (pinned is not None)
    with pytest.raises(ValueError, match=f"multiple of the SDAR block length \\({B}\\)"):  # the user's own
        on_cuda(cpu_config(path, block_size=B), monkeypatch, block_size=B + 16 if B > 16 else 12)


def test_block_attention_backend_on_cuda(monkeypatch):
    import vllm.v1.attention.selector as selector
    from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend

    import vllm_dllm_spec.model as sdar_model
    from vllm_dllm_spec.attention import BlockCausalBuilderMixin

    class FlashInferLike:
        @staticmethod
        def get_name():
            return "FLASHINFER"

    monkeypatch.setattr(sdar_model, "current_platform", FakeCuda())
    monkeypatch.setattr(selector, "get_attn_backend", lambda *a, **k: FlashAttentionBackend)
    backend = sdar_model.block_attention_backend(64)
    assert issubclass(backend, FlashAttentionBackend) and backend.get_name() == "FLASH_ATTN"
    assert issubclass(backend.get_builder_cls(), BlockCausalBuilderMixin)
    assert sdar_model.block_attention_backend(64) is backend  # one class per base backend
    monkeypatch.setattr(selector, "get_attn_backend", lambda *a, **k: FlashInferLike)
    with pytest.raises(ValueError, match="CPU_ATTN, FLASH_ATTN, TRITON_ATTN attention backends, got FLASHINFER"):
        sdar_model.block_attention_backend(64)


def test_builder_refuses_a_cache_block_that_splits_sdar_blocks(tiny_ckpt):
    from vllm.config import set_current_vllm_config
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from vllm_dllm_spec.attention import BlockCausalCPUAttentionBackend

    cfg = cpu_config(tiny_ckpt, block_size=16)  # B = 4
    spec = FullAttentionSpec(block_size=6, num_kv_heads=2, head_size=32, dtype=torch.float32)
    with set_current_vllm_config(cfg), pytest.raises(ValueError, match=r"KV cache block size \(6\).*\(4\)"):
        BlockCausalCPUAttentionBackend.get_builder_cls()(spec, ["l0"], cfg, torch.device("cpu"))
