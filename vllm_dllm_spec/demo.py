"""The README's main job: offline `LLM.generate` with block diffusion on the bundled SDAR model,
a batch of prompts at once; prints each text and the tokens per forward.

    python -m vllm_dllm_spec.demo [--model DIR] [--engine vllm|reference] [--method block_diffusion|psd]
                                  [--gen-length N] ...

`--engine reference` runs the pure-PyTorch oracle instead (one prompt at a time).
`--method psd` decodes with lossless self-speculation (same texts, fewer forwards).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

DEFAULT_PROMPTS = [
    "def fibonacci(n):\n",
    "import os\nimport sys\n\n",
    "class Stack:\n    def __init__(self):\n",
    "for i in range(",
    "    def __repr__(self):\n        return ",
    "if __name__ == '__main__':\n",
    "# Copyright",
    "from collections import",
]


def default_model() -> str:
    import vllm_dllm_spec

    try:
        return vllm_dllm_spec.bundled_model_path()
    except FileNotFoundError:
        from vllm_dllm_spec.testing import make_random_sdar_checkpoint

        path = tempfile.mkdtemp(prefix="sdar_tiny_random_")
        print(f"(no bundled checkpoint yet: using a random tiny SDAR model in {path})")
        return make_random_sdar_checkpoint(path)


def run_reference(args, model_dir: str) -> None:
    from transformers import AutoTokenizer

    from vllm_dllm_spec.reference import SDARModel, generate

    from vllm_dllm_spec.reference.psd import psd_generate

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = SDARModel.from_pretrained(model_dir)
    total_tokens = total_forwards = 0
    start = time.perf_counter()
    knobs = dict(gen_length=args.gen_length, block_length=args.block_length, denoising_steps=args.denoising_steps,
                 remasking_strategy=args.remasking_strategy, confidence_threshold=args.confidence_threshold)
    for prompt in args.prompts:
        if args.method == "psd":
            out = psd_generate(model, tokenizer.encode(prompt), draft_depth=args.draft_depth, **knobs)
        else:
            out = generate(model, tokenizer.encode(prompt), fuse_commit=True, **knobs)
        total_tokens += len(out.tokens)
        total_forwards += out.num_forwards
        print(f"--- {prompt!r}\n{tokenizer.decode(out.tokens)!r}")
        print(f"    tokens={len(out.tokens)} forwards={out.num_forwards} "
              f"tokens/forward={len(out.tokens) / out.num_forwards:.2f}")
    elapsed = time.perf_counter() - start
    print(f"SUMMARY engine=reference method={args.method} prompts={len(args.prompts)} tokens={total_tokens} "
          f"forwards={total_forwards} tokens/forward={total_tokens / total_forwards:.2f} "
          f"seconds={elapsed:.1f}")


def run_vllm(args, model_dir: str) -> None:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # one process: starts in seconds
    from vllm import LLM, SamplingParams

    options = {"method": args.method, "remasking_strategy": args.remasking_strategy,
               "confidence_threshold": args.confidence_threshold}
    if args.method == "psd":
        options["draft_depth"] = args.draft_depth
    if args.block_length is not None:
        options["block_length"] = args.block_length
    if args.denoising_steps is not None:
        options["denoising_steps"] = args.denoising_steps
    llm = LLM(model=model_dir, dtype="float32", enforce_eager=True, max_model_len=1024,
              additional_config={"dllm_spec": options})
    params = SamplingParams(max_tokens=args.gen_length, temperature=0.0)
    start = time.perf_counter()
    outputs = llm.generate(args.prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    total_tokens = total_forwards = 0
    for out in outputs:
        record = out.kv_transfer_params["dllm_spec"]
        n = len(out.outputs[0].token_ids)
        total_tokens += n
        total_forwards += record["num_forwards"]
        print(f"--- {out.prompt!r}\n{out.outputs[0].text!r}")
        print(f"    tokens={n} forwards={record['num_forwards']} "
              f"tokens/forward={record['tokens_per_forward']:.2f}")
    print(f"SUMMARY engine=vllm method={args.method} prompts={len(outputs)} tokens={total_tokens} forwards={total_forwards} "
          f"tokens/forward={total_tokens / total_forwards:.2f} seconds={elapsed:.1f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="SDAR HF directory (default: the bundled target)")
    parser.add_argument("--engine", choices=["vllm", "reference"], default="vllm")
    parser.add_argument("--method", choices=["block_diffusion", "psd"], default="block_diffusion",
                        help="psd: lossless self-speculation (greedy), same texts with fewer forwards")
    parser.add_argument("--draft-depth", type=int, default=3, help="psd: states drafted per forward")
    parser.add_argument("--gen-length", type=int, default=32)
    parser.add_argument("--block-length", type=int, default=None)
    parser.add_argument("--denoising-steps", type=int, default=None)
    parser.add_argument("--remasking-strategy", default="low_confidence_dynamic")
    parser.add_argument("--confidence-threshold", type=float, default=0.85)
    parser.add_argument("--prompts", nargs="+", default=DEFAULT_PROMPTS)
    args = parser.parse_args(argv)
    model_dir = args.model or default_model()
    (run_vllm if args.engine == "vllm" else run_reference)(args, model_dir)


if __name__ == "__main__":
    main()
