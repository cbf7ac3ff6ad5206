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
  simsd_self  SimSD, the target drafts for itself (draft: dynamic 0.85), greedy_match
  simsd       SimSD with the bundled draft model (when there is one)
  psd         PSD-style self-speculation, dynamic 0.85, draft depth 3 (lossless: dynamic's tokens)
  spiffy      Spiffy, dynamic 0.85, the draft graph shipped with the model at that block (else
              PSD's chain as a graph), 4 block copies per step, as many as PSD's depth 3 evaluates
              at most (lossless: dynamic's tokens)
  vllm_ar     the same weights served by vLLM itself as an autoregressive Qwen3 model (no plugin
              code on the path: a copy of the checkpoint whose config says Qwen3ForCausalLM):
              what ordinary vLLM serving costs. The tiny model was not trained autoregressively,
              so only its speed compares (fixed length, ignore_eos)
Reported per (method, block, batch): output tokens/s, tokens per (target) forward, mean
forwards per request, tokens finalised per step, draft forwards and accepted tokens per round
(SimSD), and the tokens/s ratios against `dynamic` and `ar` of the same block and batch
and `vllm_ar` (measured in the same run, runs interleaved). Writes JSON and a PNG plot.
After the timed runs of a batch size, every method runs once more under `phases.PhaseProfiler`:
the mean time per engine step split into engine / scheduler / runner Python / draft /
acceptance / target forward outside attention / attention / region attention (JSON
`phases_ms_per_step`, stacked bars in `<out>_phases.png`). The timed runs carry no profiler.
"""
from __future__ import annotations

import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (sets the vLLM environment before vLLM is imported)
from phases import PHASES, PhaseProfiler  # noqa: E402

PRESETS = {
    "smoke": dict(blocks=[4], batches=[1, 4], gen_length=16, reps={1: 1, 4: 1}),
    # repetitions per batch size: a batch-1 run takes ~0.1 s, so its median needs more of them
    "default": dict(blocks=[4, 8], batches=[1, 8, 32], gen_length=64, reps={1: 9, 8: 5, 32: 3}),
}


def methods(block: int) -> dict[str, dict]:
    """Plain block-diffusion methods: name -> per-request extra_args (the `dllm_spec` knobs).
    They share one engine per block length."""
    return {
        "ar": {"remasking_strategy": "sequential", "denoising_steps": block},
        "static": {"remasking_strategy": "low_confidence_static", "denoising_steps": max(1, block // 2)},
        "dynamic": {"remasking_strategy": "low_confidence_dynamic", "confidence_threshold": 0.85,
                    "denoising_steps": block},
        "entropy": {"remasking_strategy": "entropy_bounded", "eb_threshold": 0.35, "denoising_steps": block},
    }


def speculative_methods(block: int, draft_dir: str | None, model_dir: str) -> dict[str, dict]:
    """Methods that need their own engine: name -> engine `dllm_spec` option."""
    simsd = {"method": "simsd", "remasking_strategy": "low_confidence_dynamic",
             "confidence_threshold": 0.85, "verification": "greedy_match"}
    table = {"simsd_self": simsd}
    if draft_dir is not None:
        table["simsd"] = {**simsd, "draft_model": common.model_at_block(draft_dir, block)}
    table["psd"] = {"method": "psd", "draft_depth": 3, "remasking_strategy": "low_confidence_dynamic",
                    "confidence_threshold": 0.85}
    table["spiffy"] = {"method": "spiffy", "draft_graph": graph_for(model_dir, block), "graph_budget": 4,
                       "remasking_strategy": "low_confidence_dynamic", "confidence_threshold": 0.85}
    return table


def graph_for(model_dir: str, block: int) -> str:
    """The draft graph shipped next to the model's weights for this block, else PSD's chain as a
    graph (written once to a temporary file)."""
    from vllm_dllm_spec.reference.spiffy import DraftGraph, default_graph_path

    shipped = default_graph_path(block, model_dir)
    if shipped.is_file():
        return str(shipped)
    path = Path(tempfile.gettempdir()) / f"spiffy_chain_b{block}.json"
    DraftGraph.chain(6, block).to_json(path)
    return str(path)


def make_llm(model_dir: str, max_batch: int, options: dict | None = None, plugin: bool = True):
    from vllm import LLM

    extra = {"additional_config": {"dllm_spec": options or {}}} if plugin else {}
    return LLM(model=model_dir, dtype="float32", enforce_eager=True, max_model_len=512,
               max_num_seqs=max_batch, seed=0, **extra)


def as_qwen3_checkpoint(model_dir: str) -> str:
    """A copy of an SDAR checkpoint that vLLM serves as a plain Qwen3 model (weight names are 1:1;
    the plugin's hooks key on the SDAR architectures, so none of its code runs for this copy)."""
    out = Path(tempfile.mkdtemp(prefix="sdar_as_qwen3_"))
    for item in Path(model_dir).iterdir():
        if item.is_file() and not item.name.endswith(".py"):
            shutil.copy(item, out / item.name)
    cfg = json.loads((out / "config.json").read_text())
    for key in ("auto_map", "block_size", "mask_token_id"):
        cfg.pop(key, None)
    cfg.update(model_type="qwen3", architectures=["Qwen3ForCausalLM"])
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return str(out)


def run_batch(llm, prompts, gen_length: int, extra_args: dict) -> dict:
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=gen_length, temperature=0.0, ignore_eos=True, extra_args=extra_args)
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    seconds = time.perf_counter() - start
    tokens = [len(o.outputs[0].token_ids) for o in outs]
    # vLLM's own autoregressive path reports nothing: one forward per token
    records = [(o.kv_transfer_params or {}).get("dllm_spec", {"num_forwards": n}) for o, n in zip(outs, tokens)]
    return {"seconds": seconds, "tokens": tokens,
            "forwards": [r["num_forwards"] for r in records],
            "draft_forwards": [r.get("draft_forwards", 0) for r in records],
            "accepted": [a for r in records for a in r.get("accepted_per_round", [])]}


def summarize(runs: list[dict]) -> dict:
    seconds = statistics.median(r["seconds"] for r in runs)
    first = runs[0]  # greedy: every repetition has the same tokens and forwards
    tokens, forwards = sum(first["tokens"]), sum(first["forwards"])
    return {
        "seconds_median": seconds,
        "output_tokens": tokens,
        "tokens_per_s": tokens / seconds,
        "tokens_per_forward": tokens / forwards,  # per target forward for SimSD
        "mean_forwards_per_request": forwards / len(first["forwards"]),
        "tokens_per_step": tokens / forwards,  # tokens finalised per request-step
        "draft_forwards_per_token": sum(first["draft_forwards"]) / tokens,
        "accepted_per_round": (sum(first["accepted"]) / len(first["accepted"])) if first["accepted"] else None,
        "repetitions": len(runs),
    }


def profiled_run(llm, prompts, gen_length: int, extra_args: dict) -> dict:
    """One extra run with the phase profiler attached: mean ms per engine step and phase."""
    profiler = PhaseProfiler(llm)
    try:
        run_batch(llm, prompts, gen_length, extra_args)
        return {"phases_ms_per_step": profiler.per_step_ms(), "profiled_steps": profiler.steps}
    finally:
        profiler.detach()


def plot_phases(results: list[dict], path: Path) -> str | None:
    """Stacked bars: time per engine step by phase, one bar per (method, batch), one panel per block."""
    plt = common.pyplot()
    if plt is None:
        return None
    blocks = sorted({r["block"] for r in results})
    fig, axes = plt.subplots(len(blocks), 1, figsize=(max(8, 0.45 * len(results) / len(blocks) + 3), 4 * len(blocks)),
                             squeeze=False)
    for ax, block in zip(axes[:, 0], blocks):
        rows = [r for r in results if r["block"] == block and "phases_ms_per_step" in r]
        labels = [f"{r['method']}\nb{r['batch']}" for r in rows]
        bottom = [0.0] * len(rows)
        for phase in PHASES:
            values = [r["phases_ms_per_step"][phase] for r in rows]
            ax.bar(labels, values, bottom=bottom, label=phase)
            bottom = [b + v for b, v in zip(bottom, values)]
        ax.set(title=f"block {block}: time per engine step", ylabel="ms per step")
        ax.tick_params(axis="x", labelsize=7)
        ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return str(path)


def plot(results: list[dict], path: Path) -> str | None:
    plt = common.pyplot()
    if plt is None:
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
    args = common.parse_args(__doc__, PRESETS, argv, draft=True)
    preset = PRESETS[args.preset]

    from tqdm import tqdm

    from vllm_dllm_spec.testing import shutdown_llm

    model_dir = args.model or common.default_model()
    draft_dir = args.draft if args.draft else (None if args.model else common.bundled_draft())
    all_prompts = common.prompts(model_dir, max(preset["batches"]))
    max_batch = max(preset["batches"])
    results = []
    per_block = len(methods(4)) + len(speculative_methods(4, draft_dir, model_dir)) + 1  # + vllm_ar
    qwen3_dir = as_qwen3_checkpoint(model_dir)
    bar = tqdm(total=len(preset["blocks"]) * per_block * sum(preset["reps"].values()),
               desc="throughput", unit="run")
    for block in preset["blocks"]:
        target = common.model_at_block(model_dir, block)
        # one engine per configuration, all alive at once, so runs interleave (drift hits every
        # method alike); plain methods share one engine and differ by per-request knobs
        engines = {"plain": make_llm(target, max_batch)}
        runs_of = {name: ("plain", extra) for name, extra in methods(block).items()}
        for name, options in speculative_methods(block, draft_dir, model_dir).items():
            engines[name] = make_llm(target, max_batch, options)
            runs_of[name] = (name, {})
        engines["vllm_ar"] = make_llm(qwen3_dir, max_batch, plugin=False)
        runs_of["vllm_ar"] = ("vllm_ar", {})
        for llm in engines.values():
            run_batch(llm, all_prompts[:2], 8, {})  # warm-up
        for batch in preset["batches"]:
            runs: dict[str, list[dict]] = {name: [] for name in runs_of}
            for _ in range(preset["reps"][batch]):
                for name, (engine, extra) in runs_of.items():
                    runs[name].append(run_batch(engines[engine], all_prompts[:batch], preset["gen_length"], extra))
                    bar.update()
            for name, (engine, extra) in runs_of.items():
                knobs = extra or speculative_methods(block, draft_dir, model_dir).get(name, {"plugin": False})
                profile = profiled_run(engines[engine], all_prompts[:batch], preset["gen_length"], extra)
                results.append({"method": name, "block": block, "batch": batch, "knobs": knobs,
                                **summarize(runs[name]), **profile})
        for llm in engines.values():
            shutdown_llm(llm)
    bar.close()
    for r in results:
        same = {x["method"]: x for x in results if x["block"] == r["block"] and x["batch"] == r["batch"]}
        r["ratio_vs_dynamic"] = r["tokens_per_s"] / same["dynamic"]["tokens_per_s"]
        r["ratio_vs_ar"] = r["tokens_per_s"] / same["ar"]["tokens_per_s"]
        r["ratio_vs_vllm_ar"] = r["tokens_per_s"] / same["vllm_ar"]["tokens_per_s"]

    path = common.write_json("throughput", {"preset": args.preset, "model": model_dir,
                                            "gen_length": preset["gen_length"], "results": results}, args.out)
    png = plot(results, path.with_suffix(".png"))
    plot_phases(results, path.with_name(path.stem + "_phases.png"))
    top = max(results, key=lambda r: (r["batch"], r["block"] == 4))
    best = {r["method"]: r for r in results if r["batch"] == top["batch"] and r["block"] == top["block"]}
    print(f"SUMMARY throughput block={top['block']} batch={top['batch']}: "
          + ", ".join(f"{m} {r['tokens_per_s']:.0f} tok/s ({r['tokens_per_forward']:.2f} tok/fwd, "
                      f"{r['ratio_vs_ar']:.2f}x ar)" for m, r in best.items())
          + f"; json={path}" + (f" plot={png}" if png else ""))
    return {"path": str(path), "results": results}


if __name__ == "__main__":
    main()
