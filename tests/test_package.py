"""Install-level facts: the plugin entry point, lazy import, AutoConfig registration, the CLI."""
import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

VENV_BIN = Path(sys.executable).parent


def test_import_is_cheap_and_lazy():
    code = "import sys, vllm_dllm_spec; print('torch' in sys.modules, 'vllm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_entry_point_is_registered():
    eps = importlib.metadata.entry_points(group="vllm.general_plugins")
    assert [ep.value for ep in eps if ep.name == "vllm_dllm_spec"] == ["vllm_dllm_spec:register"]


def test_register_is_idempotent_and_sdar_loads_without_remote_code(tiny_ckpt):
    import vllm_dllm_spec
    from transformers import AutoConfig

    vllm_dllm_spec.register()
    vllm_dllm_spec.register()
    cfg = AutoConfig.from_pretrained(tiny_ckpt)  # no trust_remote_code
    assert type(cfg).__name__ == "SDARConfig"
    assert (cfg.model_type, cfg.block_size, cfg.mask_token_id) == ("sdar", 4, 1)
    from vllm.transformers_utils.config import _CONFIG_REGISTRY

    assert _CONFIG_REGISTRY["sdar"] is type(cfg)


def test_vllm_cli_starts():
    out = subprocess.run([str(VENV_BIN / "vllm"), "--version"], capture_output=True, text=True,
                         env={**os.environ, "VLLM_LOGGING_LEVEL": "ERROR"}, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "0.32.0" in out.stdout


def test_bundled_model_path_rejects_unknown_names():
    import vllm_dllm_spec

    with pytest.raises(ValueError, match="name must be one of"):
        vllm_dllm_spec.bundled_model_path("huge")
