#!/usr/bin/env bash
# The main job: set everything up, then run one iteration of the pipeline on the embedded default
# (simulated traffic, SmolLM2-135M-Instruct on CPU, local MLflow).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/python -m pipeline_steps.collect --params params.yaml --out data/raw --summary metrics/collect.json "$@"
