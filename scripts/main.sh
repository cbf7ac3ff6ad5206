#!/usr/bin/env bash
# The main job: sets up .venv on first use, then generates on the bundled SDAR model.
# Extra arguments go to `python -m vllm_dllm_spec.demo` (see --help).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/ensure_env.sh"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"
exec "$ROOT/.venv/bin/python" -m vllm_dllm_spec.demo "$@"
