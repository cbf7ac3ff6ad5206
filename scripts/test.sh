#!/usr/bin/env bash
# The test command: sets up .venv on first use, then runs the whole suite.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh tests/test_reference.py -x`).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/ensure_env.sh"
cd "$ROOT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"
exec "$ROOT/.venv/bin/python" -m pytest "$@"
