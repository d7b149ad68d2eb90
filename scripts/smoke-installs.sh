#!/usr/bin/env bash
# Each install line of the README, alone, in its own fresh venv (one after another, sharing
# pip's cache): install it, run a short smoke of what that line promises, delete the venv.
# Prints the time each line took. Exit codes and one-line errors are checked exactly.
#   bash scripts/smoke-installs.sh [core] [automodel] [unsloth] [unsloth-plugin]  (default: all)
#   PYTHON      interpreter for the venvs (default python3)
#   SMOKE_TORCH torch to install before ".[automodel]" (default torch==2.13.0: the CPU wheel
#               where one lies in pip's find-links; elsewhere point pip at a CPU index, e.g.
#               PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/tuneplex-smoke.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export TUNEPLEX_CACHE=$WORK/cache PIP_DISABLE_PIP_VERSION_CHECK=1
LINE=""

fail() {
  echo "smoke-installs: FAIL [$LINE] $*" >&2
  [ ! -f "$WORK/out" ] || sed 's/^/  stdout| /' "$WORK/out" | tail -n 20 >&2
  [ ! -f "$WORK/err" ] || sed 's/^/  stderr| /' "$WORK/err" | tail -n 20 >&2
  exit 1
}

# expect CODE TEXT CMD...: CMD exits with CODE; for 0 its stdout holds TEXT (if any), else its
# stderr is exactly one line and holds TEXT (a message, never a traceback)
expect() {
  local code=$1 text=$2 rc=0
  shift 2
  "$@" >"$WORK/out" 2>"$WORK/err" </dev/null || rc=$?
  [ "$rc" = "$code" ] || fail "$* exited $rc, not $code"
  if [ "$code" = 0 ]; then
    [ -z "$text" ] || grep -qF -- "$text" "$WORK/out" || fail "$*: no '$text' on stdout"
  else
    [ "$(wc -l <"$WORK/err")" = 1 ] || fail "$*: stderr is not one line"
    grep -qF -- "$text" "$WORK/err" || fail "$*: no '$text' on stderr"
  fi
}

# fresh VENV: a new venv at $WORK/venv, its bin/ first on PATH (the smokes run `tuneplex`)
fresh() {
  rm -rf "$WORK/venv" "$WORK/cache" "$WORK/run"
  "$PY" -m venv "$WORK/venv"
  "$WORK/venv/bin/python" -m pip install -q --upgrade pip
  PATH="$WORK/venv/bin:${PATH#"$WORK/venv/bin:"}"
}

absent() {  # absent MODULE...: none of them is importable in the venv
  python - "$@" <<'PY' || fail "installed, and should not be: $*"
import importlib.util, sys
found = [m for m in sys.argv[1:] if importlib.util.find_spec(m) is not None]
sys.exit(f"found: {found}" if found else 0)
PY
}

tiny_model() {  # the tiny local model and tokenizer the jobs are pointed at
  python -m tuneplex.testing.tiny "$WORK/model" --hidden 32 --intermediate 64 --layers 1 \
    --heads 2 --kv-heads 1 >/dev/null
}

smoke_core() {
  absent torch datasets transformers tuneplex_automodel tuneplex_unsloth
  expect 0 "no backends installed; pip install 'tuneplex[automodel]'" tuneplex backends
  expect 2 "pip install 'tuneplex[automodel]'" tuneplex schema automodel
  expect 2 "pip install 'tuneplex[automodel]'" tuneplex validate examples/automodel-lora.yaml
}

smoke_automodel() {
  absent tuneplex_unsloth unsloth
  expect 0 "ready: no CUDA GPU: trains on CPU" tuneplex backends
  tiny_model
  local at=(--set "model=$WORK/model")
  expect 0 "valid automodel job" tuneplex validate examples/automodel-lora.yaml "${at[@]}"
  expect 0 "train: 1200 rows -> 1200 examples" \
    tuneplex data inspect examples/automodel-lora.yaml "${at[@]}" -n 1
  expect 0 "" tuneplex train examples/automodel-lora.yaml "${at[@]}" \
    --set schedule.max_steps=2 --set training.max_seq_length=128 --output "$WORK/run"
  [ -f "$WORK/run/final/adapter_config.json" ] || fail "no adapter in $WORK/run/final"
  [ -f "$WORK/run/curves.png" ] || fail "no curves.png (matplotlib comes with the extra)"
  expect 0 "" tuneplex generate "$WORK/run" "Repeat: a b" --max-new-tokens 4
  expect 0 '"loss"' tuneplex eval "$WORK/run" --data examples/data/val.jsonl --no-generate --json
  expect 0 "wrote $WORK/hf" tuneplex export "$WORK/run" --format hf -o "$WORK/hf"
  expect 0 "wrote $WORK/run.gguf" \
    tuneplex export "$WORK/run" --format gguf --dtype q8_0 --ollama -o "$WORK/run.gguf"
  expect 2 "exists" tuneplex export "$WORK/run" --format hf -o "$WORK/hf"
  absent math_verify lm_eval llama_cpp
  expect 2 "pip install 'tuneplex[eval]'" \
    tuneplex eval "$WORK/run" --data examples/data/val.jsonl --metrics math
  expect 2 "pip install 'tuneplex[eval]'" tuneplex eval "$WORK/run" --lm-eval hellaswag
  expect 2 "pip install 'tuneplex[unsloth]'" tuneplex validate examples/unsloth-qlora.yaml
}

smoke_unsloth() {  # only unsloth installed: it is the default backend
  absent tuneplex_automodel
  expect 0 "valid unsloth job" tuneplex validate examples/unsloth-qlora.yaml
  expect 0 "valid unsloth job" tuneplex validate examples/unsloth-dpo.yaml
  expect 2 "a job for automodel? installed: unsloth; install it with: pip install 'tuneplex[automodel]'" \
    tuneplex validate examples/automodel-lora.yaml
  tiny_model
  expect 0 "train: 1200 rows -> 1200 examples" \
    tuneplex data inspect examples/unsloth-qlora.yaml --set "model.name=$WORK/model" -n 1
  tuneplex backends >"$WORK/out"
  if grep -qF "not ready: needs a CUDA GPU" "$WORK/out"; then  # the refusal, before any run
    expect 2 "unsloth: needs a CUDA GPU" \
      tuneplex train examples/unsloth-qlora.yaml --output "$WORK/run"
    [ ! -e "$WORK/run" ] || fail "a refused train left $WORK/run behind"
  fi
}

# the README's lines, as a user types them in the repository's root
install_core() { pip install -q .; }
install_automodel() {  # torch first: the extra's torch range keeps this (CPU) build
  pip install -q "${SMOKE_TORCH:-torch==2.13.0}"
  local torch
  torch=$(python -c 'import torch; print(torch.__version__)' 2>/dev/null)
  pip install -q ".[automodel]"
  [ "$(python -c 'import torch; print(torch.__version__)' 2>/dev/null)" = "$torch" ] ||
    fail "pip replaced torch $torch"
}
install_unsloth() { pip install -q ".[unsloth]"; }
install_unsloth_plugin() { pip install -q ./plugins/unsloth; }

# line NAME LABEL INSTALL SMOKE: in a fresh venv, INSTALL then SMOKE; the venv is deleted after
line() {
  [ -z "$ONLY" ] || [[ " $ONLY " == *" $1 "* ]] || return 0
  shift
  LINE=$1
  local start=$SECONDS
  fresh
  "$2"
  "$3"
  rm -rf "$WORK/venv"
  printf 'smoke-installs: %-30s ok %5d s\n' "$LINE" $((SECONDS - start))
}

ONLY="$*"  # names of the lines to run (default: all)
start=$SECONDS
line core 'pip install .' install_core smoke_core
line automodel 'pip install ".[automodel]"' install_automodel smoke_automodel
line unsloth 'pip install ".[unsloth]"' install_unsloth smoke_unsloth
line unsloth-plugin 'pip install ./plugins/unsloth' install_unsloth_plugin smoke_unsloth
printf 'smoke-installs: %-30s ok %5d s\n' "${ONLY:-all lines}" $((SECONDS - start))
