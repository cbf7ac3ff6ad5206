"""Offline throughput of the decoding methods, side by side in ONE run on the same prompts.

    python benchmarks/throughput.py [--preset smoke|default] [--model DIR] [--out FILE.json]

For each block length and batch size, every method generates the same greedy continuations
with `LLM.generate` (one in-process engine per block length and engine option; plain methods
share an engine and differ by per-request `extra_args`). Methods:
  ar          one token per forward, left to right (sequential, denoising_steps = B): what
              autoregressive decoding of the same weights costs
  static      low_confidence_static, denoising_steps = B / 2 (two tokens per forward)
  dynamic     low_confidence_dynamic, threshold 0.85 (the baseline of the ratios)
  entropy     entropy_bounded, eb_threshold 0.35
Reported per (method, block, batch): output tokens/s, tokens per forward, mean forwards per
request, tokens finalised per step, and the tokens/s ratios against `dynamic` and `ar` of the
same block and batch (measured in the same run, runs interleaved). Writes JSON and a PNG plot.
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (sets the vLLM environment before vLLM is imported)

PRESETS = {
    "smoke": dict(blocks=[4], batches=[1, 4], gen_length=16, reps=1),
    "default": dict(blocks=[4, 8], batches=[1, 8, 32], gen_length=64, reps=2),
}


def methods(block: int) -> dict[str, dict]:
    """name -> per-request extra_args (the `dllm_spec` knobs)."""
    return {
        "ar": {"remasking_strategy": "sequential", "denoising_steps": block},
        "static": {"remasking_strategy": "low_confidence_static", "denoising_steps": max(1, block // 2)},
        "dynamic": {"remasking_strategy": "low_confidence_dynamic", "confidence_threshold": 0.85,
                    "denoising_steps": block},
        "entropy": {"remasking_strategy": "entropy_bounded", "eb_threshold": 0.35, "denoising_steps": block},
    }


def run_batch(llm, prompts, gen_length: int, extra_args: dict) -> dict:
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=gen_length, temperature=0.0, ignore_eos=True, extra_args=extra_args)
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    seconds = time.perf_counter() - start
    tokens = [len(o.outputs[0].token_ids) for o in outs]
    forwards = [o.kv_transfer_params["dllm_spec"]["num_forwards"] for o in outs]
    return {"seconds": seconds, "tokens": tokens, "forwards": forwards}


def summarize(runs: list[dict]) -> dict:
    seconds = statistics.median(r["seconds"] for r in runs)
    tokens, forwards = runs[0]["tokens"], runs[0]["forwards"]
    return {
        "seconds_median": seconds,
        "output_tokens": sum(tokens),
        "tokens_per_s": sum(tokens) / seconds,
        "tokens_per_forward": sum(tokens) / sum(forwards),
        "mean_forwards_per_request": sum(forwards) / len(forwards),
        "tokens_per_step": sum(tokens) / sum(forwards),  # tokens finalised per request-step
        "repetitions": len(runs),
    }


def plot(results: list[dict], path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    blocks = sorted({r["block"] for r in results})
    fig, axes = plt.subplots(1, len(blocks), figsize=(5 * len(blocks), 4), squeeze=False)
    for ax, block in zip(axes[0], blocks):
        for name in dict.fromkeys(r["method"] for r in results):
            rows = sorted((r for r in results if r["block"] == block and r["method"] == name),
                          key=lambda r: r["batch"])
            ax.plot([r["batch"] for r in rows], [r["tokens_per_s"] for r in rows], marker="o", label=name)
        ax.set(title=f"block {block}", xlabel="batch size", ylabel="output tokens / s", xscale="log")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return str(path)


def main(argv=None) -> dict:
    args = common.parse_args(__doc__, PRESETS, argv)
    preset = PRESETS[args.preset]

    from tqdm import tqdm
    from vllm import LLM

    model_dir = args.model or common.default_model()
    all_prompts = common.prompts(model_dir, max(preset["batches"]))
    results = []
    total = sum(len(methods(b)) * len(preset["batches"]) * preset["reps"] for b in preset["blocks"])
    bar = tqdm(total=total, desc="throughput", unit="run")
    for block in preset["blocks"]:
        llm = LLM(model=common.model_at_block(model_dir, block), dtype="float32", enforce_eager=True,
                  max_model_len=512, max_num_seqs=max(preset["batches"]), seed=0)
        table = methods(block)
        run_batch(llm, all_prompts[:2], 8, table["dynamic"])  # warm-up
        for batch in preset["batches"]:
            runs: dict[str, list[dict]] = {name: [] for name in table}
            for _ in range(preset["reps"]):
                for name, extra in table.items():  # interleaved: drift hits every method alike
                    runs[name].append(run_batch(llm, all_prompts[:batch], preset["gen_length"], extra))
                    bar.update()
            for name in table:
                results.append({"method": name, "block": block, "batch": batch, "knobs": table[name],
                                **summarize(runs[name])})
        del llm
    bar.close()
    for r in results:
        same = {x["method"]: x for x in results if x["block"] == r["block"] and x["batch"] == r["batch"]}
        r["ratio_vs_dynamic"] = r["tokens_per_s"] / same["dynamic"]["tokens_per_s"]
        r["ratio_vs_ar"] = r["tokens_per_s"] / same["ar"]["tokens_per_s"]

    path = common.write_json("throughput", {"preset": args.preset, "model": model_dir,
                                            "gen_length": preset["gen_length"], "results": results}, args.out)
    png = plot(results, path.with_suffix(".png"))
    top = max(results, key=lambda r: (r["batch"], r["block"] == 4))
    best = {r["method"]: r for r in results if r["batch"] == top["batch"] and r["block"] == top["block"]}
    print(f"SUMMARY throughput block={top['block']} batch={top['batch']}: "
          + ", ".join(f"{m} {r['tokens_per_s']:.0f} tok/s ({r['tokens_per_forward']:.2f} tok/fwd, "
                      f"{r['ratio_vs_ar']:.2f}x ar)" for m, r in best.items())
          + f"; json={path}" + (f" plot={png}" if png else ""))
    return {"path": str(path), "results": results}


if __name__ == "__main__":
    main()
