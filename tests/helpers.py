"""Helpers shared by the training tests (plain functions; fixtures live in conftest.py)."""

from __future__ import annotations

import json
import math
import os
import random
import socket
import subprocess
import sys

import yaml
from tuneplex.cli import main
from tuneplex.runs import read_metrics


def chat_rows(n: int, *, seed: int = 0) -> list[dict]:
    """A small 'reverse the words' chat task over the tiny tokenizer's vocabulary."""
    from tuneplex.tiny import WORDS

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [rng.choice(WORDS[:30]) for _ in range(rng.randint(3, 6))]
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": "Reverse: " + " ".join(words)},
                    {"role": "assistant", "content": " ".join(reversed(words))},
                ]
            }
        )
    return rows


def write_rows(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def merge_yaml(base: str, extra: str) -> str:
    """`base` with the top-level sections of `extra` merged in (one level deep)."""
    doc = yaml.safe_load(base)
    for key, value in (yaml.safe_load(extra) or {}).items():
        if isinstance(value, dict) and isinstance(doc.get(key), dict):
            doc[key].update(value)
        else:
            doc[key] = value
    return yaml.safe_dump(doc)


def train(capsys, *args) -> tuple[int, str, str]:
    """`tuneplex train ARGS` in-process: (exit code, stdout, stderr)."""
    code = main(["train", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


def losses(run, split="train") -> list[float]:
    return [e["loss"] for e in read_metrics(run) if e["split"] == split]


def cli(*args, check=True, env=None):
    """`tuneplex train ARGS` in a subprocess (the launcher starts the workers)."""
    proc = subprocess.run(
        [sys.executable, "-m", "tuneplex", "train", *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
        timeout=600,
    )
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def assert_same_run(a, b, rel=1e-5):
    ea, eb = read_metrics(a), read_metrics(b)
    assert [(e["step"], e["split"]) for e in ea] == [(e["step"], e["split"]) for e in eb]
    for x, y in zip(ea, eb, strict=True):
        assert math.isclose(x["loss"], y["loss"], rel_tol=rel), (x, y)
        if x["split"] == "train":
            assert math.isclose(x["grad_norm"], y["grad_norm"], rel_tol=1e-4), (x, y)
            assert x["tokens"] == y["tokens"]


def assert_same_final(a, b, atol=1e-4):
    import torch
    from safetensors.torch import load_file

    files = sorted(p.name for p in (a / "final").glob("*.safetensors"))
    assert files == sorted(p.name for p in (b / "final").glob("*.safetensors")) and files
    for name in files:
        x, y = load_file(a / "final" / name), load_file(b / "final" / name)
        assert x.keys() == y.keys()
        for k in x:
            assert torch.allclose(x[k], y[k], atol=atol), (name, k, (x[k] - y[k]).abs().max())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PARALLEL_JOB = """\
model: {model}
dataset: {{training: {root}/train.jsonl, validation: {root}/val.jsonl}}
training: {{finetuning_type: {ft}, max_seq_length: 96}}
schedule: {{epochs: 1, seed: 3}}
batch: {{global_batch_size: {gbs}, micro_batch_size: 1, sequence_packing: {packed}}}
optimizer: {{learning_rate: 5.0e-3, warmup_steps: 1}}
output: {{checkpoint_steps: 2}}
"""
"""The job the parallel runs are compared on: 14 training rows make 4 steps of 4, the last one
short (2 rows), with validation before, in between and after."""


def parallel_job(root, name: str, *, model, ft: str, gbs: int = 4, packed: bool = False):
    """Write `root/name.yaml` (and, once, the rows it trains on); return its path."""
    if not (root / "train.jsonl").exists():
        write_rows(root / "train.jsonl", chat_rows(14))
        write_rows(root / "val.jsonl", chat_rows(5, seed=1))
    path = root / f"{name}.yaml"
    text = PARALLEL_JOB.format(model=model, root=root, ft=ft, gbs=gbs, packed=str(packed).lower())
    path.write_text(text)
    return path


def reference_runs(root) -> dict:
    """The one-process run of `root`'s lora.yaml and all_weights.yaml: {finetuning type: run}."""
    runs = {}
    for ft in ("lora", "all_weights"):
        runs[ft] = root / f"single-{ft}"
        cli(root / f"{ft}.yaml", "-o", runs[ft])
    return runs


def layout(procs: int, **sizes) -> list[str]:
    """--set arguments for `procs` worker processes and the given parallel sizes."""
    sets = {"num_gpus_per_node": procs, **sizes}
    return [a for k, v in sets.items() for a in ("--set", f"parallelism.{k}={v}")]


def load_final(run, ft: str):
    """final/ of a run loaded the way a user would: the model, or base model + peft adapter."""
    from transformers import AutoModelForCausalLM

    if ft != "lora":
        return AutoModelForCausalLM.from_pretrained(run / "final")
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(json.loads((run / "job.json").read_text())["model"])
    return PeftModel.from_pretrained(base, run / "final")
