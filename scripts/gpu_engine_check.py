"""One engine check on a GPU (run by scripts/gpu_check.sh where vLLM with CUDA imports):
  python scripts/gpu_engine_check.py --backend FLASH_ATTN|TRITON_ATTN --mode eager|piecewise

A tiny random SDAR checkpoint (block 4) in bf16, a mixed batch of 4 prompts with one strategy
each, block diffusion / PSD / SimSD one engine after another; greedy outputs against the pure
PyTorch oracles run in bf16 on the host. bf16 kernels are not bit-exact with the reference,
so (as tests/test_vllm_bf16.py) it checks the mechanics (lengths) and that most tokens agree,
and the CUDA-graph mode the hook chose. Prints one line per method, non-zero exit on a failure.
Not yet run on a GPU (no task with a device has run it so far)."""
from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

AGREEMENT = 0.75  # least fraction of greedy tokens equal to the bf16 oracle's


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", choices=["FLASH_ATTN", "TRITON_ATTN"], required=True)
    ap.add_argument("--mode", choices=["eager", "piecewise"], required=True)
    args = ap.parse_args()

    import torch
    from vllm import LLM, SamplingParams
    from vllm.config import CUDAGraphMode

    from vllm_dllm_spec.reference import SDARModel, generate
    from vllm_dllm_spec.reference.psd import psd_generate
    from vllm_dllm_spec.reference.simsd import simsd_generate
    from vllm_dllm_spec.reference.spiffy import DraftGraph, spiffy_generate
    from vllm_dllm_spec.testing import make_random_sdar_checkpoint, shutdown_llm

    path = make_random_sdar_checkpoint(tempfile.mkdtemp(prefix="gpu_check_"), seed=0)
    ref = SDARModel.from_pretrained(path, dtype=torch.bfloat16)  # the oracle runs on the host
    rng = random.Random(0)
    prompts = [[rng.randrange(2, ref.config.vocab_size) for _ in range(n)] for n in (1, 5, 9, 17)]
    configs = [{"remasking_strategy": "sequential"}, {"remasking_strategy": "low_confidence_static"},
               {"remasking_strategy": "low_confidence_dynamic", "confidence_threshold": 0.3},
               {"remasking_strategy": "entropy_bounded", "eb_threshold": 2.0}]
    max_tokens = 12
    graph = str(Path(path) / "graph_b4.json")
    DraftGraph((((1, 1),), ((2, 1),), ((1, 1), (2, 1))), 4, {"kind": "gpu check"}).to_json(graph)
    oracles = {
        "block_diffusion": lambda p, c: generate(ref, p, gen_length=max_tokens, fuse_commit=True, **c).tokens,
        "psd": lambda p, c: psd_generate(ref, p, gen_length=max_tokens, draft_depth=2, **c).tokens,
        "simsd": lambda p, c: simsd_generate(ref, None, p, gen_length=max_tokens, num_draft_blocks=2, **{
            {"remasking_strategy": "draft_remasking_strategy"}.get(k, k): v for k, v in c.items()}).tokens,
        "spiffy": lambda p, c: spiffy_generate(ref, p, gen_length=max_tokens, graph=graph, graph_budget=4, **c).tokens,
    }
    options = {"block_diffusion": {}, "psd": {"draft_depth": 2}, "simsd": {"num_draft_blocks": 2},
               "spiffy": {"draft_graph": graph, "graph_budget": 4}}
    failed = False
    for method, oracle in oracles.items():
        llm = LLM(model=path, dtype="bfloat16", max_model_len=256, max_num_seqs=4, seed=0,
                  enforce_eager=args.mode == "eager", attention_backend=args.backend,
                  additional_config={"dllm_spec": {"method": method, **options[method]}})
        cfg = llm.llm_engine.vllm_config
        want_mode = CUDAGraphMode.NONE if args.mode == "eager" else CUDAGraphMode.PIECEWISE
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                            [SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, extra_args=c)
                             for c in configs], use_tqdm=False)
        same = total = 0
        for p, c, o in zip(prompts, configs, outs):
            got, want = list(o.outputs[0].token_ids), oracle(p, c)
            total += len(want)
            same += sum(a == b for a, b in zip(got, want))
            if len(got) != len(want):
                failed = True
                print(f"{method}: prompt of {len(p)}: {len(got)} tokens, the oracle {len(want)}")
        ok = same >= AGREEMENT * total and cfg.compilation_config.cudagraph_mode == want_mode
        failed |= not ok
        print(f"[{'ok' if ok else 'FAIL'}] {args.backend} {args.mode} {method}: {same}/{total} tokens equal "
              f"the bf16 oracle; cudagraph_mode {cfg.compilation_config.cudagraph_mode.name}")
        shutdown_llm(llm)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
