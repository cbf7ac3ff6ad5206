"""Shared helpers of the benchmarks: model/prompt selection, machine description, JSON output.

Every benchmark prints ONE line starting with "SUMMARY" and writes its figures as JSON under
benchmarks/results/ (git-ignored) unless --out says otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def parse_args(doc: str, presets: dict, argv=None, draft: bool = False,
               extra: list[tuple[str, dict]] = ()) -> argparse.Namespace:
    """--preset / --model / --out (and --draft, and a benchmark's own `extra` flags)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=presets, default="default")
    parser.add_argument("--model", default=None, help="SDAR HF directory (default: the bundled target)")
    parser.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/<name>.json)")
    if draft:
        parser.add_argument("--draft", default=None,
                            help="draft SDAR directory for SimSD (default: the bundled draft with the "
                                 "bundled target; none with --model)")
    for flag, kwargs in extra:
        parser.add_argument(flag, **kwargs)
    return parser.parse_args(argv)


def bundled_draft() -> str | None:
    import vllm_dllm_spec

    try:
        return vllm_dllm_spec.bundled_model_path("draft")
    except FileNotFoundError:
        return None


def machine() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = None
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": gpu, "python": platform.python_version(),
            "load_avg_at_start": os.getloadavg()}


def default_model(name: str = "target") -> str:
    """The bundled checkpoint; a random tiny one when the package has none (numbers then only
    show the machinery, not a trained model's behaviour)."""
    import vllm_dllm_spec

    try:
        return vllm_dllm_spec.bundled_model_path(name)
    except FileNotFoundError:
        from vllm_dllm_spec.testing import make_random_sdar_checkpoint

        return make_random_sdar_checkpoint(tempfile.mkdtemp(prefix="bench_random_sdar_"))


def model_at_block(model_dir: str, block_length: int) -> str:
    """`model_dir` itself when it was trained at `block_length`; otherwise a copy whose
    config.json declares that block size (weights unchanged: the model then runs at a block
    length it was not trained with, like SDAR's generate script allows)."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    if int(cfg.get("block_size", 4)) == block_length:
        return model_dir
    out = Path(tempfile.mkdtemp(prefix=f"sdar_b{block_length}_"))
    for item in Path(model_dir).iterdir():
        if item.is_file():
            shutil.copy(item, out / item.name)
    cfg["block_size"] = block_length
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return str(out)


def prompts(model_dir: str, num: int, prompt_tokens: int = 48) -> list[list[int]]:
    """Held-out prompts of the bundled models' corpus (stdlib files the models never saw)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    try:
        from vllm_dllm_spec.tools.evaluate_tiny import heldout_prompts

        found = [ids for _, ids in heldout_prompts(tok, num, prompt_tokens)]
    except (ImportError, OSError):
        found = []
    if not found:  # e.g. a stdlib without sources: prompts from this file's own code
        text = Path(__file__).read_text()
        ids = tok.encode(text)
        found = [ids[i: i + prompt_tokens] for i in range(0, len(ids) - prompt_tokens, prompt_tokens)]
    return (found * (num // len(found) + 1))[:num]


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or None without matplotlib (plots are
    optional: the JSON carries every figure)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def write_json(name: str, payload: dict, out: str | None) -> Path:
    path = Path(out) if out else RESULTS_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": machine(), **payload}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path
