#!/usr/bin/env bash
# Demo on a fresh machine: install tuneplex with its backends into .venv, then walk through the
# example automodel job.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/tuneplex ] || bash scripts/setup.sh
export HF_HUB_OFFLINE=1
tp=.venv/bin/tuneplex
set -x
$tp backends
$tp validate examples/automodel-lora.yaml
$tp validate examples/automodel-multinode.yaml --set parallelism.tensor_parallel_size=4
# a mistake is reported with its key and a suggestion (exit code 2)
$tp validate examples/automodel-lora.yaml --set training.lora.rnak=8 || true
