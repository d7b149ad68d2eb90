#!/usr/bin/env bash
# Demo on a fresh machine: install tuneplex with its backends into .venv, build a tiny model and
# tokenizer locally (no downloads), and fine-tune it with LoRA on the bundled chat data on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/tuneplex ] || bash scripts/setup.sh
export HF_HUB_OFFLINE=1
tp=.venv/bin/tuneplex
set -x
$tp backends
[ -f models/tiny-llama/model.safetensors ] ||
  .venv/bin/python -m tuneplex.testing.tiny models/tiny-llama --hidden 128 --intermediate 256 --init-std 0.1
$tp validate examples/automodel-lora.yaml
# a mistake is reported with its key and a suggestion (exit code 2)
$tp validate examples/automodel-lora.yaml --set training.lora.rnak=8 || true
# what the model is trained on: answer tokens highlighted, everything else masked
$tp data inspect examples/automodel-lora.yaml -n 1
$tp train examples/automodel-lora.yaml --output runs/demo --overwrite
$tp runs show runs/demo  # the outcome, and how to load final/; the curves are in runs/demo/curves.png
set +x
.venv/bin/python - <<'PY'
import json
events = [json.loads(line) for line in open("runs/demo/metrics.jsonl")]
val = [e for e in events if e["split"] == "val"]
print("validation loss:", "  ".join(f"step {e['step']}: {e['loss']:.3f}" for e in val))
summary = json.load(open("runs/demo/summary.json"))
print(f"{summary['tokens']:,} tokens in {summary['elapsed_s']:.0f} s; adapter in runs/demo/final")
PY
# ask the tuned model a question from the validation data, then its base model the same one
set -x
$tp generate runs/demo "Count the words: blue green river" --max-new-tokens 24
$tp generate models/tiny-llama "Count the words: blue green river" --max-new-tokens 24
