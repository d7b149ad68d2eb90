#!/usr/bin/env bash
# Run the test suite (sets up .venv first if it is missing); `--quick` runs all but the tests
# marked slow (multi-process proofs, benchmark checks). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/tuneplex ] || bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if [ "${1:-}" = "--quick" ]; then  # the quick tier: everything but the multi-process proofs
  shift
  exec .venv/bin/python -m pytest -q -m "not slow" "$@"
fi
.venv/bin/python -m pytest -q "$@"
