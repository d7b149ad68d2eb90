#!/usr/bin/env bash
# Regenerate the job references in docs/ from the live schemas (a test checks they match).
set -euo pipefail
cd "$(dirname "$0")/.."
for backend in automodel unsloth; do
  .venv/bin/tuneplex schema "$backend" --format markdown > "docs/$backend-job.md"
done
# the README's model-family table, from the automodel plugin's plans
.venv/bin/python - <<'PY'
import re
from pathlib import Path

from tuneplex_automodel.parallel.plans import table_markdown

readme = Path("README.md")
text = readme.read_text()
pattern = re.compile(r"(<!-- families:begin[^\n]*-->\n).*?(<!-- families:end -->)", re.S)
readme.write_text(pattern.sub(lambda m: m[1] + table_markdown() + m[2], text, count=1))
PY
