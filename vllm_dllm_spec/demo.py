"""The README's main job: generate with block diffusion on the bundled SDAR model and print the
texts with tokens per forward.

    python -m vllm_dllm_spec.demo [--model DIR] [--engine reference] [--gen-length N] ...
"""
from __future__ import annotations

import argparse
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

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = SDARModel.from_pretrained(model_dir)
    total_tokens = total_forwards = 0
    start = time.perf_counter()
    for prompt in args.prompts:
        out = generate(
            model,
            tokenizer.encode(prompt),
            gen_length=args.gen_length,
            block_length=args.block_length,
            denoising_steps=args.denoising_steps,
            remasking_strategy=args.remasking_strategy,
            confidence_threshold=args.confidence_threshold,
            fuse_commit=True,
        )
        total_tokens += len(out.tokens)
        total_forwards += out.num_forwards
        print(f"--- {prompt!r}\n{tokenizer.decode(out.tokens)!r}")
        print(f"    tokens={len(out.tokens)} forwards={out.num_forwards} "
              f"tokens/forward={len(out.tokens) / out.num_forwards:.2f}")
    elapsed = time.perf_counter() - start
    print(f"SUMMARY engine=reference prompts={len(args.prompts)} tokens={total_tokens} "
          f"forwards={total_forwards} tokens/forward={total_tokens / total_forwards:.2f} "
          f"seconds={elapsed:.1f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="SDAR HF directory (default: the bundled target)")
    parser.add_argument("--engine", choices=["reference"], default="reference")
    parser.add_argument("--gen-length", type=int, default=32)
    parser.add_argument("--block-length", type=int, default=None)
    parser.add_argument("--denoising-steps", type=int, default=None)
    parser.add_argument("--remasking-strategy", default="low_confidence_dynamic")
    parser.add_argument("--confidence-threshold", type=float, default=0.85)
    parser.add_argument("--prompts", nargs="+", default=DEFAULT_PROMPTS)
    args = parser.parse_args(argv)
    model_dir = args.model or default_model()
    run_reference(args, model_dir)


if __name__ == "__main__":
    main()
