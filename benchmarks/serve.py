"""A real `vllm serve` on 127.0.0.1 under a request-rate sweep, driven by vLLM's own load
generator `vllm bench serve` (Poisson arrivals, streamed completions, its TTFT / ITL / TPOT
metrics): throughput and latency percentiles per method.

    python benchmarks/serve.py [--preset smoke|default] [--model DIR] [--out FILE.json]

One server serves every plain method (the method's knobs ride on each request as `vllm_xargs`,
passed through `vllm bench serve --extra-body`). The prompts are the held-out prompts of the
other benchmarks, written as a `custom` dataset; every request generates a fixed length
(`--ignore-eos`). A step of the plugin may return several tokens at once: vLLM's ITL is the gap
between streamed chunks, TPOT the per-token average.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from throughput import methods  # noqa: E402

from vllm_dllm_spec.testing import VLLMServer  # noqa: E402

PRESETS = {
    # smoke: no warm-up run (each `vllm bench serve` is a ~10 s process start): it checks the pipeline, not speed
    "smoke": dict(rates=[4.0], num_requests=4, gen_length=16, methods=["ar", "dynamic"], warmup=False),
    "default": dict(rates=[1.0, 4.0, 16.0], num_requests=24, gen_length=64,
                    methods=["ar", "static", "dynamic"], warmup=True),
}
PERCENTILES = (50, 90, 99)
METRICS = ("ttft", "itl", "tpot", "e2el")


def write_dataset(model_dir: str, prompts: list[list[int]], path: Path) -> Path:
    """The prompts as `vllm bench serve`'s custom JSONL dataset (text; re-tokenised by the server)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    path.write_text("".join(json.dumps({"prompt": tok.decode(p)}) + "\n" for p in prompts))
    return path


def bench_serve(port: int, model_dir: str, dataset: Path, rate: float, num: int, gen_length: int,
                xargs: dict, seed: int) -> dict:
    """One `vllm bench serve` run against the server; returns its result JSON."""
    vllm_cli = Path(sys.executable).parent / "vllm"
    with tempfile.TemporaryDirectory(prefix="bench_serve_") as out_dir:
        cmd = [str(vllm_cli), "bench", "serve", "--backend", "openai",
               "--base-url", f"http://127.0.0.1:{port}", "--model", "sdar", "--tokenizer", model_dir,
               "--dataset-name", "custom", "--dataset-path", str(dataset), "--skip-chat-template",
               "--disable-shuffle", "--custom-output-len", str(gen_length), "--ignore-eos",
               "--temperature", "0", "--request-rate", str(rate), "--num-prompts", str(num),
               "--seed", str(seed), "--extra-body", json.dumps({"vllm_xargs": xargs}),
               "--percentile-metrics", ",".join(METRICS),
               "--metric-percentiles", ",".join(str(p) for p in PERCENTILES),
               "--save-result", "--result-dir", out_dir, "--result-filename", "result.json",
               "--disable-tqdm"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0:
            raise RuntimeError(f"vllm bench serve failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        return json.loads((Path(out_dir) / "result.json").read_text())


def row(method: str, rate: float, knobs: dict, result: dict) -> dict:
    """The figures this project reports, from vLLM's result (ms -> s)."""
    out = {"method": method, "rate": rate, "knobs": knobs, "requests": result["completed"],
           "failed": result.get("failed", 0), "output_tokens": result["total_output_tokens"],
           "wall_s": result["duration"], "tokens_per_s": result["output_throughput"]}
    for metric in METRICS:
        out[f"{metric}_mean"] = result[f"mean_{metric}_ms"] / 1000
        for p in PERCENTILES:
            out[f"{metric}_p{p}"] = result[f"p{p}_{metric}_ms"] / 1000
    return out


def main(argv=None) -> dict:
    args = common.parse_args(__doc__, PRESETS, argv)
    preset = PRESETS[args.preset]

    from tqdm import tqdm

    model_dir = args.model or common.default_model()
    block = int(json.loads((Path(model_dir) / "config.json").read_text())["block_size"])
    table = {name: knobs for name, knobs in methods(block).items() if name in preset["methods"]}
    log_path = common.RESULTS_DIR / "serve_server.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="serve_prompts_") as tmp:
        dataset = write_dataset(model_dir, common.prompts(model_dir, preset["num_requests"]),
                                Path(tmp) / "prompts.jsonl")
        with VLLMServer(model_dir, log_path, {}, max_num_seqs=32) as server:
            if preset["warmup"]:
                bench_serve(server.port, model_dir, dataset, 100.0, 2, 8, table[preset["methods"][0]], 0)
            bar = tqdm(total=len(preset["rates"]) * len(table), desc="serve sweep", unit="run")
            for rate in preset["rates"]:
                for name, knobs in table.items():
                    result = bench_serve(server.port, model_dir, dataset, rate, preset["num_requests"],
                                         preset["gen_length"], knobs, seed=1)
                    rows.append(row(name, rate, knobs, result))
                    bar.update()
            bar.close()
    base_name = preset["methods"][0]
    for r in rows:
        base = next(x for x in rows if x["rate"] == r["rate"] and x["method"] == base_name)
        r[f"ratio_vs_{base_name}"] = r["tokens_per_s"] / base["tokens_per_s"]
    path = common.write_json("serve", {"preset": args.preset, "model": model_dir, "load_generator": "vllm bench serve",
                                       "gen_length": preset["gen_length"], "results": rows}, args.out)
    top = max(r["rate"] for r in rows)
    print(f"SUMMARY serve rate={top}/s (vllm bench serve): " + ", ".join(
        f"{r['method']} {r['tokens_per_s']:.0f} tok/s ttft_p50 {r['ttft_p50'] * 1000:.0f} ms "
        f"itl_p50 {r['itl_p50'] * 1000:.1f} ms" for r in rows if r["rate"] == top) + f"; json={path}")
    return {"path": str(path), "results": rows}


if __name__ == "__main__":
    main()
