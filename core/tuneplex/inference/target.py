"""What `generate`, `chat`, `eval` (and later `export`) are pointed at, resolved before anything
heavy loads: a run directory (its final/ or a checkpoint), a model or adapter directory, or a
Hugging Face id. Every refusal is one line naming the path."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

from tuneplex.data.spec import DataSpec
from tuneplex.errors import Problem, UsageError

CHECKPOINT_CHOICES = "best, latest or step_N"
_STEP = re.compile(r"^(?:step_)?(\d+)$")


@dataclass(frozen=True, kw_only=True)
class Target:
    """A model to load, and how training saw it."""

    label: str
    """What the user named (for messages and reports)."""
    path: str
    """What `from_pretrained` loads: a model directory or Hub id, or a peft adapter directory."""
    adapter: bool
    """`path` is a peft adapter, loaded on `base`."""
    base: str | None
    """The model a run or an adapter started from (None: a model named directly)."""
    tokenizer: str
    """Where the tokenizer comes from."""
    spec: DataSpec
    """How training rendered and masked rows (a run's own data settings; else the tokenizer's
    chat template)."""
    run: Path | None = None
    checkpoint: str | None = None
    """`step_N` when a checkpoint was picked instead of final/."""
    dtype: str | None = None
    autocast: str | None = None
    quantization: str | None = None
    trust_remote_code: bool = False

    def baseline(self) -> Target:
        """The base model, loaded and rendered the same way (`eval --baseline`)."""
        if self.base is None:
            raise UsageError(
                Problem(
                    "--baseline",
                    f"{self.label} is a model of its own; the baseline is the model a run or an "
                    "adapter started from (point at the run or the adapter)",
                )
            )
        return replace(
            self,
            label=f"{self.base} (base)",
            path=self.base,
            adapter=False,
            base=None,
            checkpoint=None,
        )


def resolve(ref: str, *, checkpoint: str | None = None, device: str, scratch: Path) -> Target:
    """The Target `ref` names. A run's backend must be installed (it knows the run's job and
    its checkpoints); `scratch`, an empty directory the caller removes after use, is where a
    checkpoint is written as a loadable directory."""
    from tuneplex.runs.directory import is_run

    path = Path(ref).expanduser()
    if path.exists():
        if is_run(path):
            return _run(path, checkpoint=checkpoint, device=device, scratch=scratch)
        if checkpoint is not None:
            raise UsageError(Problem("--checkpoint", f"{ref} is not a run directory"))
        return _directory(path, label=ref)
    if checkpoint is not None:
        raise UsageError(Problem("--checkpoint", f"{ref} is not a run directory"))
    from tuneplex.data.sources import hub_offline

    if hub_offline() or not _looks_like_hub_id(ref):
        why = "and the Hub is offline (HF_HUB_OFFLINE)" if hub_offline() else "nor a Hub id"
        raise UsageError(Problem(ref, f"no such run or model directory, {why}"))
    return Target(
        label=ref, path=ref, adapter=False, base=None, tokenizer=ref, spec=_plain_spec(ref)
    )


def _looks_like_hub_id(ref: str) -> bool:
    return re.fullmatch(r"[\w.-]+(/[\w.-]+)?", ref) is not None


def _plain_spec(tokenizer: str, *, trust_remote_code: bool = False) -> DataSpec:
    """A model's own way of rendering: its tokenizer's chat template when it has one (the
    encoder refuses chats otherwise, as training would)."""
    return DataSpec(
        train="",
        tokenizer=tokenizer,
        max_seq_length=1 << 30,
        chat_template="tokenizer",
        trust_remote_code=trust_remote_code,
        train_key="--file",
    )


def _directory(path: Path, *, label: str) -> Target:
    """A model directory (config.json + safetensors) or a peft adapter directory."""
    adapter_config = path / "adapter_config.json"
    if adapter_config.is_file():
        from tuneplex.runs.listing import read_json

        base = read_json(adapter_config).get("base_model_name_or_path")
        if not isinstance(base, str) or not base:
            raise UsageError(
                Problem(str(adapter_config), "names no base model (base_model_name_or_path)")
            )
        tokenizer = str(path) if _has_tokenizer(path) else base
        return Target(
            label=label,
            path=str(path),
            adapter=True,
            base=base,
            tokenizer=tokenizer,
            spec=_plain_spec(tokenizer),
        )
    from tuneplex.nn.models import resolve_model_ref

    where, _ = resolve_model_ref(str(path), key=label)
    return Target(
        label=label, path=where, adapter=False, base=None, tokenizer=where, spec=_plain_spec(where)
    )


def _has_tokenizer(path: Path) -> bool:
    return (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()


def run_backend_and_job(run_dir: Path):
    """(the run's backend, its validated job), or the one-line reason there is none."""
    from tuneplex.runs.listing import read_run, run_job

    info = read_run(run_dir, metrics=False)
    found, why = run_job(info)
    if found is None:
        raise UsageError(Problem(str(run_dir), why))
    return found


def _run(path: Path, *, checkpoint: str | None, device: str, scratch: Path) -> Target:
    from tuneplex.runs.records import FINAL_DIR

    backend, job = run_backend_and_job(path)
    if checkpoint is None:
        weights, picked = path / FINAL_DIR, None
        _check_final(path, weights)
    else:
        weights, picked = _checkpoint(path, checkpoint)
    trained = backend.trained_model(job, weights, device=device, scratch=scratch)
    spec = backend.data_spec(job)
    adapter = (trained.path / "adapter_config.json").is_file()
    tokenizer = str(weights) if _has_tokenizer(weights) else spec.tokenizer
    return Target(
        label=str(path) + (f" ({picked})" if picked else ""),
        path=str(trained.path),
        adapter=adapter,
        base=trained.base,
        tokenizer=tokenizer,
        spec=replace(
            spec,
            tokenizer=tokenizer,
            packing=False,
            preference=False,
            prompts=False,  # rendering as training did; what the rows are is the command's
            reference_column=None,
            reference_required=False,
        ),
        run=path,
        checkpoint=picked,
        dtype=trained.dtype,
        autocast=trained.autocast,
        quantization=trained.quantization,
        trust_remote_code=trained.trust_remote_code,
    )


def _check_final(run_dir: Path, final: Path) -> None:
    from tuneplex.runs.checkpoints import complete_checkpoints

    if not final.is_dir():
        kept = [f"step_{s}" for s, _ in complete_checkpoints(run_dir)]
        hint = (
            f"checkpoints: {', '.join(kept)}; pick one with --checkpoint {CHECKPOINT_CHOICES}"
            if kept
            else "and it kept no checkpoint"
        )
        raise UsageError(Problem(str(run_dir), f"no final/ (the run did not finish); {hint}"))
    if not (final / "adapter_config.json").is_file() and not (final / "config.json").is_file():
        raise UsageError(
            Problem(str(final), "damaged: neither adapter_config.json nor config.json")
        )
    weights = [*final.glob("*.safetensors")]
    if not weights:
        raise UsageError(Problem(str(final), "damaged: no .safetensors weights"))


def _checkpoint(run_dir: Path, choice: str) -> tuple[Path, str]:
    """(the checkpoint directory, `step_N`) that --checkpoint names."""
    from tuneplex.runs.checkpoints import complete_checkpoints

    kept = dict(complete_checkpoints(run_dir))
    names = ", ".join(f"step_{s}" for s in sorted(kept)) or "none"
    if choice == "latest":
        if not kept:
            raise UsageError(Problem("--checkpoint", f"{run_dir} kept no complete checkpoint"))
        step = max(kept)
    elif choice == "best":
        step = _best_step(run_dir)
        if step not in kept:
            raise UsageError(
                Problem(
                    "--checkpoint",
                    f"best: the best validation loss was at step {step}, whose checkpoint is "
                    f"not kept (kept: {names})",
                )
            )
    else:
        m = _STEP.match(choice)
        if m is None:
            raise UsageError(
                Problem(
                    "--checkpoint", f"{choice!r}: expected {CHECKPOINT_CHOICES} (kept: {names})"
                )
            )
        step = int(m.group(1))
        if step not in kept:
            raise UsageError(
                Problem("--checkpoint", f"step_{step}: no such complete checkpoint (kept: {names})")
            )
    return kept[step], f"step_{step}"


def _best_step(run_dir: Path) -> int:
    from tuneplex.runs.listing import best_validation, read_run

    found = best_validation(read_run(run_dir))
    if found is None:
        raise UsageError(Problem("--checkpoint", f"best: {run_dir} recorded no validation loss"))
    return found[0]
