"""Smoke runs of the benchmarks on their smallest presets (a tiny random model): the JSON holds
every figure and the ratios come from the same run."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def run_bench(script: str, model: str, out: Path, *extra: str) -> str:
    proc = subprocess.run([sys.executable, str(BENCH / script), "--preset", "smoke", "--model", model,
                           "--out", str(out), *extra], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = [line for line in proc.stdout.splitlines() if line.startswith("SUMMARY")]
    assert len(summary) == 1, proc.stdout[-2000:]
    return summary[0]


@pytest.mark.slow
def test_throughput_smoke(tiny_ckpt, tiny_tied_ckpt, tmp_path):
    out = tmp_path / "throughput.json"
    run_bench("throughput.py", tiny_ckpt, out, "--draft", tiny_tied_ckpt)
    data = json.loads(out.read_text())
    assert data["machine"]["cores"] >= 1
    rows = data["results"]
    assert {r["method"] for r in rows} == {"ar", "static", "dynamic", "entropy", "simsd", "simsd_self", "psd",
                                           "spiffy", "vllm_ar"}
    for r in rows:
        same = {x["method"]: x for x in rows if x["block"] == r["block"] and x["batch"] == r["batch"]}
        assert r["ratio_vs_ar"] == pytest.approx(r["tokens_per_s"] / same["ar"]["tokens_per_s"])
        assert r["ratio_vs_dynamic"] == pytest.approx(r["tokens_per_s"] / same["dynamic"]["tokens_per_s"])
        assert r["ratio_vs_vllm_ar"] == pytest.approx(r["tokens_per_s"] / same["vllm_ar"]["tokens_per_s"])
        assert r["output_tokens"] == 16 * r["batch"]
        assert r["tokens_per_forward"] > 0 and r["mean_forwards_per_request"] > 0
    ar = [r for r in rows if r["method"] == "ar"]
    static = [r for r in rows if r["method"] == "static"]
    # forward accounting: one token per forward for ar; static (B/2 steps) halves the forwards
    assert all(r["tokens_per_forward"] <= 1.0 for r in ar)
    assert all(r["tokens_per_forward"] == 1.0 for r in rows if r["method"] == "vllm_ar")
    assert all(s["tokens_per_forward"] > a["tokens_per_forward"] for s, a in zip(static, ar))
    for r in rows:  # SimSD rows carry the draft's cost and the acceptance
        speculative = r["method"].startswith("simsd")
        assert (r["draft_forwards_per_token"] > 0) == speculative
        assert (r["accepted_per_round"] is not None) == speculative
    assert out.with_suffix(".png").is_file()
    # per-phase profile: every row, exclusive ms per step; drafting and the region only where they exist
    assert out.with_name("throughput_phases.png").is_file()
    for r in rows:
        phases = r["phases_ms_per_step"]
        assert r["profiled_steps"] > 0 and all(v >= 0 for v in phases.values())
        assert phases["attention"] > 0 and phases["target_rest"] > 0 and phases["runner"] > 0
        verifies = r["method"].startswith("simsd") or r["method"] in ("psd", "spiffy")
        assert (phases["region_attn"] > 0) == verifies
        assert (phases["draft"] > 0) == verifies


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


@pytest.mark.slow
def test_serve_smoke(tiny_ckpt, tmp_path):
    out = tmp_path / "serve.json"
    summary = run_bench("serve.py", tiny_ckpt, out)
    data = json.loads(out.read_text())
    rows = data["results"]
    assert data["load_generator"] == "vllm bench serve"
    assert {r["method"] for r in rows} == {"ar", "dynamic"}
    for r in rows:
        assert r["requests"] == 4 and r["failed"] == 0 and r["output_tokens"] == 4 * 16
        assert 0 < r["tpot_p50"] and r["e2el_p50"] >= r["ttft_p50"]
        assert 0 < r["ttft_p50"] <= r["ttft_p99"] and r["itl_p50"] is not None
        base = next(x for x in rows if x["rate"] == r["rate"] and x["method"] == "ar")
        assert r["ratio_vs_ar"] == pytest.approx(r["tokens_per_s"] / base["tokens_per_s"])
    assert "tok/s" in summary


def test_report_renders_from_json_only(tmp_path):
    """The README section is generated from the JSON: figures appear, and re-running replaces
    the section instead of appending a second one."""
    results = tmp_path / "results"
    results.mkdir()
    row = {"method": "ar", "block": 4, "batch": 8, "tokens_per_s": 123.4, "tokens_per_forward": 1.0,
           "mean_forwards_per_request": 16.0, "ratio_vs_ar": 1.0, "ratio_vs_dynamic": 0.5}
    (results / "throughput.json").write_text(json.dumps({
        "created": "now", "preset": "smoke", "gen_length": 16, "results": [row],
        "machine": {"cpu": "TestCPU", "cores": 2, "gpu": None, "load_avg_at_start": [1.0, 1.0, 1.0]}}))
    readme = tmp_path / "README.md"
    readme.write_text("# x\n")
    cmd = [sys.executable, str(BENCH / "report.py"), "--results", str(results), "--readme", str(readme),
           "--docs", str(tmp_path / "docs")]
    for _ in range(2):
        subprocess.run(cmd, check=True, capture_output=True)
    text = readme.read_text()
    assert text.count("## Performance") == 1 and "| 4 | 8 | ar | 123 | 1.00 | 16.0 | 0.00 | - |" in text
    assert "TestCPU" in text
    # a run without the throughput JSON keeps its subsection as it was
    (results / "throughput.json").unlink()
    subprocess.run(cmd, check=True, capture_output=True)
    assert readme.read_text() == text


@pytest.mark.slow
def test_simsd_quality_smoke(tiny_ckpt, tiny_tied_ckpt, tmp_path):
    out = tmp_path / "sq.json"
    run_bench("simsd_quality.py", tiny_ckpt, out, "--draft", tiny_tied_ckpt)
    rows = json.loads(out.read_text())["results"]
    assert set(rows) == {"block_diffusion", "simsd", "simsd_self", "simsd_no_rope_copy"}
    base = rows["block_diffusion"]["target_forwards_per_token"]
    for r in rows.values():
        assert r["target_forward_reduction"] == pytest.approx(base / r["target_forwards_per_token"])
        assert 0.0 <= r["matched_prefix"] <= r["token_agreement"] <= 1.0
    # self-draft verifies its own blocks in one target forward each: fewer target forwards
    assert rows["simsd_self"]["target_forwards_per_token"] < base
    assert rows["simsd_self"]["acceptance_rate"] > rows["simsd_no_rope_copy"]["acceptance_rate"]


def test_psd_oracle_smoke(tiny_ckpt, tmp_path):
    out = tmp_path / "psd.json"
    summary = run_bench("psd_oracle.py", tiny_ckpt, out)
    rows = json.loads(out.read_text())["results"]
    assert {(r["method"], r["draft_depth"]) for r in rows} == {("plain", 0), ("psd", 1), ("psd", 3), ("spiffy", 2),
                                                               ("spiffy", 3)}
    plain = next(r for r in rows if r["method"] == "plain")
    for r in rows:
        assert r["identical_to_plain"] == 1.0  # lossless
        assert r["forward_reduction"] == pytest.approx(r["tokens_per_forward"] / plain["tokens_per_forward"])
        assert r["forward_reduction"] >= 1.0
    assert next(r for r in rows if r["draft_depth"] == 1)["forward_reduction"] == pytest.approx(1.0)
    assert "identical to plain 100%" in summary
    assert (tmp_path / "psd_pareto.png").stat().st_size > 0
    results = tmp_path / "results"
    results.mkdir()
    (results / "psd_oracle.json").write_text(out.read_text())
    readme = tmp_path / "README.md"
    readme.write_text("# x\n")
    subprocess.run([sys.executable, str(BENCH / "report.py"), "--results", str(results), "--readme", str(readme),
                    "--docs", str(tmp_path / "docs")], check=True, capture_output=True)
    assert "| 4 | low_confidence_dynamic | psd | 3 |" in readme.read_text()
    assert "| 4 | low_confidence_dynamic | spiffy | 3 |" in readme.read_text()


def test_kernels_smoke(tmp_path):
    out = tmp_path / "kernels.json"
    proc = subprocess.run([sys.executable, str(BENCH / "kernels.py"), "--preset", "smoke", "--threads", "1",
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["all_equal"] and data["rows"]
    for r in data["rows"]:
        assert r["speedup"] == pytest.approx(r["ref_us"] / r["op_us"])
    assert set(data["speedup_at_batch64"]) <= {"ref_token_mask", "greedy_match", "rejection_sample",
                                               "hierarchical_accept"}


def test_edit_similarity_is_levenshtein_based(monkeypatch):
    import importlib
    import os

    # benchmarks/common.py sets VLLM_* defaults in os.environ on import: keep them out of this
    # process, where later tests start servers that must log at INFO
    monkeypatch.setattr(os, "environ", dict(os.environ))
    monkeypatch.syspath_prepend(str(BENCH))
    quality = importlib.import_module("quality")

    assert quality.edit_similarity("kitten", "sitting") == pytest.approx(1 - 3 / 7)
    assert quality.edit_similarity("", "") == 1.0 and quality.edit_similarity("abc", "") == 0.0
    assert quality.distinct_ngrams([1, 2, 1, 2, 1, 2], 2) == pytest.approx(2 / 5)
    assert quality.first_line(" = x\n    y") == " = x"


@pytest.mark.slow
def test_quality_smoke(tiny_ckpt, tiny_tied_ckpt, tmp_path):
    out = tmp_path / "quality.json"
    summary = run_bench("quality.py", tiny_ckpt, out, "--draft", tiny_tied_ckpt, "--compare", tiny_ckpt)
    rows = json.loads(out.read_text())["results"]
    plain = ("static", "dynamic@0.85", "dynamic@0.7")
    assert set(rows) == {*plain, "simsd", "simsd_self", "psd", *(f"compare0:{p}" for p in plain)}
    for p in plain:  # the same checkpoint passed again gives the same figures
        assert rows[f"compare0:{p}"] == rows[p]
    assert rows["psd"]["edit_similarity"] == rows["dynamic@0.85"]["edit_similarity"]  # lossless
    for r in rows.values():
        assert 0.0 <= r["edit_similarity"] <= 1.0 and 0.0 <= r["first_line_exact"] <= 1.0
        assert r["tokens_per_forward"] >= 1.0
    assert "psd: sim" in summary


def test_psd_oracle_graph_next_to_weights(tiny_ckpt, tmp_path):
    """A draft_graph_b{B}.json beside the weights is measured when its knobs are the panel's (so a
    calibrate_graph output can be benchmarked on any model); for other knobs one is calibrated."""
    import shutil

    sys.path.insert(0, str(BENCH))
    from psd_oracle import graph_for

    from vllm_dllm_spec.reference import SDARModel
    from vllm_dllm_spec.reference.spiffy import DraftGraph

    model_dir = tmp_path / "m"
    shutil.copytree(tiny_ckpt, model_dir)
    config = SDARModel.from_pretrained(model_dir).config
    knobs = {"block_length": 4, "denoising_steps": 4, "remasking_strategy": "low_confidence_dynamic",
             "confidence_threshold": 0.85, "eb_threshold": 0.35}
    DraftGraph((((2, 1),),), 4, {"knobs": knobs}).to_json(model_dir / "draft_graph_b4.json")
    graph, source = graph_for(str(model_dir), config, 4, "low_confidence_dynamic", [[5, 6, 7]], 8)
    assert graph.nodes == (((2, 1),),) and "next to the weights" in source
    graph, source = graph_for(str(model_dir), config, 4, "low_confidence_static", [[5, 6, 7]], 8)
    assert "calibrated on 1 other prompts" in source
    assert graph.meta["knobs"]["remasking_strategy"] == "low_confidence_static"
