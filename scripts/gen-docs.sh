#!/usr/bin/env bash
# Regenerate the job references in docs/ from the live schemas (a test checks they match).
set -euo pipefail
cd "$(dirname "$0")/.."
for backend in automodel unsloth; do
  .venv/bin/tuneplex schema "$backend" --format markdown > "docs/$backend-job.md"
done
