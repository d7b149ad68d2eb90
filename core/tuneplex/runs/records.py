"""A run's records: metrics.jsonl and summary.json, written so readers never see half a file."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
FINAL_DIR = "final"
ROLLOUTS_FILE = "rollouts.jsonl"
"""Reinforcement learning's samples: every few steps some prompts, their completions and
rewards, one JSON object per completion (`RunRecorder.rollouts`)."""
EVALS_DIR = "evals"
"""A run's eval reports, one JSON file each (`<UTC time>.json`), written by `tuneplex eval`."""


def new_eval_path(run_dir: Path) -> Path:
    """Where the next eval report goes: `evals/<UTC second>.json`, `-2`, `-3`... for more in
    the same second (`eval_order` sorts them as written)."""
    folder = Path(run_dir) / EVALS_DIR
    folder.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    path, n = folder / f"{stamp}.json", 1
    while path.exists():
        n += 1
        path = folder / f"{stamp}-{n}.json"
    return path


def eval_order(path: Path) -> tuple[str, int]:
    """The order `new_eval_path` wrote reports in, from their names."""
    stamp, _, n = path.stem.rpartition("-")
    if stamp.count("-") == 1 and n.isdigit():
        return stamp, int(n)
    return path.stem, 1


@dataclass(frozen=True, kw_only=True)
class RunHeader:
    """What summary.json says about the model, the device and the data: the same keys for
    every backend (None where a backend has nothing to say), read back by `tuneplex runs`."""

    model: str
    """The job's model reference."""
    device: str
    """Where it trained, in words: processes, device, precision."""
    training_type: str
    finetuning_type: str
    trainable_parameters: int
    total_parameters: int
    data: dict[str, Any]
    """{"train": stats, "validation": stats or None}: what preparing each split kept and dropped."""
    model_class: str | None = None
    """The architecture's class (automodel), named before any wrapping hides it."""
    loader: str | None = None
    """How the model was loaded (unsloth: its loader)."""
    parallel: dict[str, int] | None = None
    """The parallel layout's sizes (automodel)."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON through a temporary file and a rename: readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


class MetricsLog:
    """metrics.jsonl: one JSON object per event (train step, validation, ...).

    Opened for a resumed run, events after the checkpoint's step are dropped first, so the
    file always tells the story of one run without duplicated or orphaned steps.
    """

    def __init__(self, run_dir: Path, *, resume_step: int | None = None, name: str = METRICS_FILE):
        self.path = run_dir / name
        if resume_step is not None and self.path.is_file():
            kept = [
                line
                for line in self.path.read_text(encoding="utf-8").splitlines()
                if line.strip() and _event_step(line) <= resume_step
            ]
            tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
            tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
            os.replace(tmp, self.path)
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self._fh = self.path.open("a", encoding="utf-8")

    def write(self, **event: Any) -> None:
        self._fh.write(json.dumps(event) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def _event_step(line: str) -> float:
    try:
        return json.loads(line).get("step", 0)
    except json.JSONDecodeError:  # a line cut by a crash
        return float("inf")


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS_FILE
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    write_json_atomic(run_dir / SUMMARY_FILE, summary)


def peak_memory(device_type: str) -> dict[str, Any]:
    """summary.json's memory figure: CUDA max allocated on a GPU, the process's max RSS on CPU."""
    if device_type == "cuda":
        import torch

        return {
            "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3),
            "peak_memory_kind": "cuda max allocated",
        }
    import resource

    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_memory_gib": round(rss_kib / 2**20, 3), "peak_memory_kind": "process max RSS"}


def run_summary(
    status: str,
    *,
    backend: str,
    header: RunHeader | None,
    steps: int,
    total_steps: int,
    epochs: float,
    train_loss: float | None,
    val_loss: float | None,
    best_val_loss: float | None,
    tokens: int,
    elapsed_s: float,
    device_type: str,
    last_checkpoint: str | None,
    **extra: Any,
) -> dict[str, Any]:
    """summary.json, the same keys for every backend (status: completed, interrupted, diverged,
    failed)."""
    return {
        "status": status,
        "backend": backend,
        **(header.as_dict() if header is not None else {}),
        "steps": steps,
        "total_steps": total_steps,
        "epochs": round(epochs, 4),
        "train_loss": train_loss,
        "val_loss": val_loss,
        "best_val_loss": best_val_loss,
        "tokens": tokens,
        "elapsed_s": round(elapsed_s, 3),
        "tokens_per_s": round(tokens / elapsed_s, 1) if elapsed_s > 0 else None,
        **peak_memory(device_type),
        "last_checkpoint": last_checkpoint,
        "final": FINAL_DIR if status == "completed" else None,
        **extra,
    }
