"""A real `vllm serve` on 127.0.0.1 under a bounded request-rate sweep, through the OpenAI client
with concurrent streams: throughput, TTFT and inter-token latency percentiles per method.

    python benchmarks/serve.py [--preset smoke|default] [--model DIR] [--out FILE.json]

One server serves every plain method (the method's knobs ride on each request as `vllm_xargs`).
For each request rate (Poisson arrivals, a fixed number of requests) and each method, requests
stream completions; the run stops by itself and shuts the server down.
"""
from __future__ import annotations

import asyncio
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from throughput import methods  # noqa: E402

from vllm_dllm_spec.testing import VLLMServer  # noqa: E402

PRESETS = {
    "smoke": dict(rates=[4.0], num_requests=4, gen_length=16, methods=["ar", "dynamic"]),
    "default": dict(rates=[1.0, 4.0, 16.0], num_requests=24, gen_length=64,
                    methods=["ar", "static", "dynamic"]),
}


async def one_request(client, prompt: list[int], gen_length: int, xargs: dict) -> dict:
    start = time.perf_counter()
    chunks = []  # (arrival time, tokens in chunk)
    stream = await client.completions.create(
        model="sdar", prompt=prompt, max_tokens=gen_length, temperature=0.0, stream=True,
        extra_body={"ignore_eos": True, "vllm_xargs": xargs, "return_token_ids": True})
    async for event in stream:
        choice = event.choices[0]
        ids = getattr(choice, "token_ids", None)
        n = len(ids) if ids is not None else (1 if choice.text else 0)
        if n:
            chunks.append((time.perf_counter(), n))
    end = time.perf_counter()
    tokens = sum(n for _, n in chunks)
    gaps = [(b[0] - a[0]) / b[1] for a, b in zip(chunks, chunks[1:])]  # per-token inter-arrival
    return {"ttft": chunks[0][0] - start if chunks else None, "latency": end - start,
            "tokens": tokens, "itl": gaps}


async def sweep_one(port: int, prompts, rate: float, gen_length: int, xargs: dict, seed: int) -> dict:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=600)
    rng = random.Random(seed)
    tasks = []
    start = time.perf_counter()
    for p in prompts:
        tasks.append(asyncio.create_task(one_request(client, p, gen_length, xargs)))
        await asyncio.sleep(rng.expovariate(rate))
    results = await asyncio.gather(*tasks)
    wall = time.perf_counter() - start
    await client.close()

    def pct(values, q):
        values = sorted(values)
        return values[min(len(values) - 1, int(q / 100 * len(values)))] if values else None

    ttft = [r["ttft"] for r in results if r["ttft"] is not None]
    itl = [g for r in results for g in r["itl"]]
    return {
        "requests": len(results), "output_tokens": sum(r["tokens"] for r in results),
        "wall_s": wall, "tokens_per_s": sum(r["tokens"] for r in results) / wall,
        "ttft_p50": pct(ttft, 50), "ttft_p90": pct(ttft, 90), "ttft_p99": pct(ttft, 99),
        "itl_p50": pct(itl, 50), "itl_p90": pct(itl, 90), "itl_p99": pct(itl, 99),
        "latency_mean": statistics.mean(r["latency"] for r in results),
    }


def main(argv=None) -> dict:
    args = common.parse_args(__doc__, PRESETS, argv)
    preset = PRESETS[args.preset]

    from tqdm import tqdm

    model_dir = args.model or common.default_model()
    block = int(__import__("json").loads((Path(model_dir) / "config.json").read_text())["block_size"])
    table = {name: knobs for name, knobs in methods(block).items() if name in preset["methods"]}
    prompts = common.prompts(model_dir, preset["num_requests"])
    log_path = common.RESULTS_DIR / "serve_server.log"
    rows = []
    with VLLMServer(model_dir, log_path, {}, max_num_seqs=32) as server:
        port = server.port
        asyncio.run(sweep_one(port, prompts[:2], 100.0, 8, table[preset["methods"][0]], 0))  # warm-up
        bar = tqdm(total=len(preset["rates"]) * len(table), desc="serve sweep", unit="run")
        for rate in preset["rates"]:
            for name, knobs in table.items():
                stats = asyncio.run(sweep_one(port, prompts, rate, preset["gen_length"], knobs, seed=1))
                rows.append({"method": name, "rate": rate, "knobs": knobs, **stats})
                bar.update()
        bar.close()
    for r in rows:
        base = next(x for x in rows if x["rate"] == r["rate"] and x["method"] == preset["methods"][0])
        r[f"ratio_vs_{preset['methods'][0]}"] = r["tokens_per_s"] / base["tokens_per_s"]
    path = common.write_json("serve", {"preset": args.preset, "model": model_dir,
                                       "gen_length": preset["gen_length"], "results": rows}, args.out)
    top = max(r["rate"] for r in rows)
    print(f"SUMMARY serve rate={top}/s: " + ", ".join(
        f"{r['method']} {r['tokens_per_s']:.0f} tok/s ttft_p50 {r['ttft_p50'] * 1000:.0f} ms "
        f"itl_p50 {r['itl_p50'] * 1000 if r['itl_p50'] is not None else float('nan'):.1f} ms"
        for r in rows if r["rate"] == top) + f"; json={path}")
    return {"path": str(path), "results": rows}


if __name__ == "__main__":
    main()
