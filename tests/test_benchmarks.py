"""Smoke runs of the benchmarks on their smallest presets (a tiny random model): the JSON holds
every figure and the ratios come from the same run."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def run_bench(script: str, model: str, out: Path) -> str:
    proc = subprocess.run([sys.executable, str(BENCH / script), "--preset", "smoke", "--model", model,
                           "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = [line for line in proc.stdout.splitlines() if line.startswith("SUMMARY")]
    assert len(summary) == 1, proc.stdout[-2000:]
    return summary[0]


@pytest.mark.slow
def test_throughput_smoke(tiny_ckpt, tmp_path):
    out = tmp_path / "throughput.json"
    run_bench("throughput.py", tiny_ckpt, out)
    data = json.loads(out.read_text())
    assert data["machine"]["cores"] >= 1
    rows = data["results"]
    assert {r["method"] for r in rows} == {"ar", "static", "dynamic", "entropy"}
    for r in rows:
        same = {x["method"]: x for x in rows if x["block"] == r["block"] and x["batch"] == r["batch"]}
        assert r["ratio_vs_ar"] == pytest.approx(r["tokens_per_s"] / same["ar"]["tokens_per_s"])
        assert r["ratio_vs_dynamic"] == pytest.approx(r["tokens_per_s"] / same["dynamic"]["tokens_per_s"])
        assert r["output_tokens"] == 16 * r["batch"]
        assert r["tokens_per_forward"] > 0 and r["mean_forwards_per_request"] > 0
    ar = [r for r in rows if r["method"] == "ar"]
    static = [r for r in rows if r["method"] == "static"]
    # forward accounting: one token per forward for ar; static (B/2 steps) halves the forwards
    assert all(r["tokens_per_forward"] <= 1.0 for r in ar)
    assert all(s["tokens_per_forward"] > a["tokens_per_forward"] for s, a in zip(static, ar))
    assert out.with_suffix(".png").is_file()


@pytest.mark.slow
def test_reference_vs_vllm_smoke(tiny_ckpt, tmp_path):
    out = tmp_path / "rv.json"
    run_bench("reference_vs_vllm.py", tiny_ckpt, out)
    data = json.loads(out.read_text())
    assert data["identical_outputs"] == data["num_prompts"]
    assert data["throughput_ratio"] == pytest.approx(
        data["vllm"]["tokens_per_s"] / data["reference"]["tokens_per_s"])
    # the plugin fuses each commit into the next denoising forward: fewer forwards per token
    assert data["vllm"]["forwards_per_token"] < data["reference"]["forwards_per_token"]
