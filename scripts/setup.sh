#!/usr/bin/env bash
# Development environment in .venv: every backend with its real dependencies, installed
# editable so changes to core/ and plugins/ take effect without reinstalling.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# the user-facing install: core + both plugins + their dependencies (torch, transformers, peft,
# unsloth, bitsandbytes, trl), the dev tools, and llama.cpp's binding the GGUF tests run
# (compiled at its first install, ~6 minutes on 2 cores; pip's cache keeps the wheel)
.venv/bin/python -m pip install -q ".[all,dev,llamacpp]"
# then the same three distributions again, editable (no dependency changes)
.venv/bin/python -m pip install -q --no-deps -e . -e plugins/automodel -e plugins/unsloth
.venv/bin/python -m pip check
