#!/usr/bin/env bash
# The prepared device check (issue 14): one command, < 10 minutes on one NVIDIA GPU.
#   bash scripts/gpu_check.sh            (from the repository root, on the GPU machine)
# 1. builds csrc (vllm_dllm_spec._C) with nvcc, in place, CUDA kernels included;
# 2. runs the CUDA op tests (tests/test_ops.py: every op against its PyTorch twin on cuda, and
#    the nvcc compile check of csrc/cuda);
# 3. when vLLM (a CUDA build) imports, runs the plugin engine on the GPU through FLASH_ATTN and
#    TRITON_ATTN, each eager and with PIECEWISE CUDA graphs (scripts/gpu_engine_check.py);
#    otherwise says so and stops there (vLLM cannot be installed on every device machine).
# Uses $PYTHON (default: .venv/bin/python when present, else python3); needs torch with CUDA.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then [ -x .venv/bin/python ] && PY=.venv/bin/python || PY=python3; fi
T0=$SECONDS
step() { echo; echo "== [gpu_check $((SECONDS - T0))s] $*"; }

step "device"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
command -v nvcc >/dev/null || { echo "gpu_check: nvcc not found (set CUDA_HOME or add it to PATH)"; exit 2; }
nvcc --version | tail -1
"$PY" -c "import torch; assert torch.cuda.is_available(), 'torch has no CUDA device'; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"

step "build csrc with nvcc (in place)"
"$PY" -c "import pytest, numpy" || { echo "gpu_check: needs pytest and numpy next to torch (no network is assumed)"; exit 2; }
timeout 400 "$PY" setup.py -q build_ext --inplace
"$PY" -c "from vllm_dllm_spec import ops; assert ops.has_kernel('greedy_match', 'cuda'), 'built without CUDA kernels'; print('CUDA kernels registered')"

step "CUDA op tests"
timeout 200 "$PY" -m pytest -q -p no:cacheprovider tests/test_ops.py -k "cuda"

step "plugin engine on the GPU"
if "$PY" -c "import vllm, torch; assert torch.cuda.is_available()" 2>/dev/null; then
  for backend in FLASH_ATTN TRITON_ATTN; do
    for mode in eager piecewise; do
      timeout 240 "$PY" scripts/gpu_engine_check.py --backend "$backend" --mode "$mode"
    done
  done
else
  echo "gpu_check: vLLM with CUDA is not importable here; the engine ran only through the CPU"
  echo "stand-ins (tests/test_vllm_gpu_wiring.py). Install the cuda extra to run this step."
fi
step "done"
