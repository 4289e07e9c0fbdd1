#!/usr/bin/env bash
# The main job: set everything up, then run one iteration of Iterative PPO on the embedded default (simulated
# traffic, SmolLM2-135M-Instruct on CPU, local MLflow) with `dvc repro`, and print the iteration's summary.
#
#   bash scripts/main.sh                  # one iteration: dvc repro (only what changed reruns), then the summary
#   bash scripts/main.sh --profile gpu    # with profiles/gpu.yaml merged in (dvc exp run -S ...), e.g. on a GPU box
#   bash scripts/main.sh -f               # anything else is passed to `dvc repro` (-f: rerun every stage)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false DVC_NO_ANALYTICS=1 PATH="$PWD/.venv/bin:$PATH"

profile=""
if [ "${1:-}" = "--profile" ]; then profile="${2:?--profile needs a name (profiles/<name>.yaml)}"; shift 2; fi

# DVC versions every dataset and model of the iteration; it needs a git repository and .dvc/ (committed).
git rev-parse --is-inside-work-tree >/dev/null 2>&1 || git init -q
[ -f .dvc/config ] || dvc init -q

started=$(date +%s)
if [ -n "$profile" ]; then
  echo "==> one iteration: dvc exp run with profiles/$profile.yaml"
  # shellcheck disable=SC2046  # the -S flags are meant to split
  dvc exp run $(python -m pipeline_steps.common.step_commands exp-args "profiles/$profile.yaml") "$@"
else
  echo "==> one iteration: dvc repro"
  dvc repro "$@"
fi

elapsed=$(( $(date +%s) - started ))
echo "==> summary"
python -m pipeline_steps.cli summary
printf '==> iteration wall time: %d min %02d s (stages that were up to date were skipped)\n' $((elapsed / 60)) $((elapsed % 60))
