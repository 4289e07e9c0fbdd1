#!/usr/bin/env bash
# Set everything up, then run the test suite (tiny models; the real model only where a test is about it).
# Extra arguments go to pytest. pytest's exit code is kept: 5 ("no tests ran") fails like any other.
# Test files run on IPPO_TEST_WORKERS processes (pytest-xdist, default 2: the CI machine's cores; a file's
# tests stay on one worker, so its module fixtures are built once). `-n 0` in the arguments runs serially.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest -n "${IPPO_TEST_WORKERS:-2}" --dist loadfile "$@"
