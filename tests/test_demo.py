"""The README's main job runs end to end (both engines) and reports tokens per forward."""
import re
import subprocess
import sys

import pytest


@pytest.mark.parametrize("engine,method", [("vllm", "block_diffusion"), ("reference", "block_diffusion"),
                                           ("vllm", "psd")])
def test_main_job_prints_texts_and_tokens_per_forward(tiny_ckpt, engine, method):
    proc = subprocess.run(
        [sys.executable, "-m", "vllm_dllm_spec.demo", "--model", tiny_ckpt, "--engine", engine,
         "--method", method, "--gen-length", "8", "--prompts", "def f(x):", "import os"],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = re.search(r"SUMMARY engine=(\w+) method=(\w+) prompts=2 tokens=16 forwards=(\d+) "
                        r"tokens/forward=([\d.]+)", proc.stdout)
    assert summary and summary.group(1, 2) == (engine, method), proc.stdout[-2000:]
    assert 16 / int(summary.group(3)) == pytest.approx(float(summary.group(4)), abs=0.01)
    assert proc.stdout.count("tokens/forward=") == 3  # one line per prompt + the summary
