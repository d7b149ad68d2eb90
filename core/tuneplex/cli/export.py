"""`tuneplex export`: what a run trained, as a merged Hugging Face directory or a GGUF file.

Every refusal (flags, target, output) comes before any weight loads, in one line, exit 2."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from tuneplex.cli.common import reported
from tuneplex.cli.targets import CheckpointOpt, TargetArg, resolved
from tuneplex.errors import Problem, UsageError, did_you_mean

if TYPE_CHECKING:
    from tuneplex.inference.target import Target

FORMATS = ("hf", "gguf")
HF_DTYPE_FLAGS = ("bf16", "f16", "f32")
SOURCE_FLAGS = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}
GGUF_IN_TORCH = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}
"""The dtype a model is merged into for a GGUF type: that type itself where torch has it, so
the merge rounds once; a quantized type quantizes from the weights' own dtype."""
FINAL_NAMES = ("final", "adapter")
"""Directory names that say less than their parent's (`run/final`, `run/final/adapter`)."""


@reported
def export_cmd(
    target: TargetArg,
    fmt: Annotated[
        str,
        typer.Option(
            "--format",
            help="hf: one standalone Hugging Face directory (transformers, vLLM, TGI); "
            "gguf: one GGUF file (llama.cpp, Ollama, LM Studio).",
        ),
    ],
    dtype: Annotated[
        str | None,
        typer.Option(
            "--dtype",
            help="hf: bf16, f16 or f32; gguf: f32, f16, bf16, q8_0 or q4_0. Default: the dtype "
            "the weights are stored in (the base's, for an adapter).",
        ),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="Where to write. Default, in the current directory: NAME-hf/ (hf) or "
            "NAME-DTYPE.gguf (gguf), NAME being the run's (with -step_N for a checkpoint) or "
            "the model directory's.",
        ),
    ] = None,
    checkpoint: CheckpointOpt = None,
    ollama: Annotated[
        bool,
        typer.Option(
            "--ollama",
            help="gguf: also write an Ollama Modelfile beside the file (NAME-DTYPE.Modelfile).",
        ),
    ] = False,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite",
            help="Replace an earlier export at the output (never anything else). The new one "
            "is written aside and renamed into place: a failed export keeps the old one.",
        ),
    ] = False,
) -> None:
    """Write a run's model (an adapter merged into its base in float32 and rounded once, or
    full weights as trained) for other runtimes, with its tokenizer, its chat template and the
    end-of-turn token(s) its training taught as end of sequence. Weights stored quantized are
    refused; an adapter trained on a 4/8-bit-loaded base is merged into the base's
    full-precision weights."""
    _check_flags(fmt, dtype=dtype, ollama=ollama, output=output)
    gguf = _gguf() if fmt == "gguf" else None
    if gguf is not None and dtype is not None and dtype not in gguf.GGUF_DTYPES:
        raise _bad_dtype(dtype, fmt, gguf.GGUF_DTYPES)
    from tuneplex.export.merge import merge, source_of

    with resolved(target, checkpoint=checkpoint, device="cpu") as found:
        source = source_of(found)
        flag = dtype or SOURCE_FLAGS[source.dtype]
        out = (
            output if output is not None else default_output(found, ref=target, fmt=fmt, flag=flag)
        )
        outs = [out, out.with_suffix(".Modelfile")] if ollama else [out]
        _check_outputs(outs, fmt=fmt, overwrite=overwrite, target=found)
        if gguf is not None:
            reason = gguf.gguf_refusal(source.config)
            if reason is not None:
                raise UsageError(Problem(found.label, reason))
        typer.echo(_plan(found, fmt=fmt, flag=flag, out=out), err=True)
        work = _work_dtype(fmt, flag, source.dtype)
        merged = merge(target=found, source=source, dtype=work)
        from tuneplex.export.output import staged

        with staged(outs) as tmps:
            if gguf is None:
                from tuneplex.export.hf import write_hf

                report = {**write_hf(merged=merged, out=tmps[0]), "path": str(out)}
                notes = []
            else:
                report, notes = _write_gguf(gguf, merged, tmps, out=out, flag=flag)
    _tell(report, fmt=fmt, outs=outs, notes=[*notes, *_stop_notes(merged.stop_strings, fmt)])


def _check_flags(fmt: str, *, dtype: str | None, ollama: bool, output: Path | None) -> None:
    if fmt not in FORMATS:
        raise UsageError(
            Problem(
                "--format", f"{fmt!r}: choose from {', '.join(FORMATS)}{did_you_mean(fmt, FORMATS)}"
            )
        )
    if fmt == "hf" and dtype is not None and dtype not in HF_DTYPE_FLAGS:
        raise _bad_dtype(dtype, fmt, HF_DTYPE_FLAGS)
    if ollama and fmt != "gguf":
        raise UsageError(Problem("--ollama", "an Ollama Modelfile goes with --format gguf"))
    if fmt == "gguf" and output is not None and output.suffix != ".gguf":
        raise UsageError(Problem("--output", f"{output}: a GGUF file's name ends in .gguf"))


def _bad_dtype(dtype: str, fmt: str, choices) -> UsageError:
    return UsageError(
        Problem(
            "--dtype",
            f"{dtype!r}: with --format {fmt} choose from {', '.join(choices)}"
            f"{did_you_mean(dtype, choices)}",
        )
    )


def _gguf():
    """`tuneplex.export.gguf` and `tuneplex.export.ollama` as one namespace, imported only
    for --format gguf."""
    try:
        from tuneplex.export import gguf, ollama
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith("tuneplex.export"):
            raise UsageError(
                Problem("--format", "gguf: this tuneplex has no GGUF writer")
            ) from None
        raise
    from types import SimpleNamespace

    return SimpleNamespace(
        GGUF_DTYPES=tuple(gguf.GGUF_DTYPES),
        gguf_refusal=gguf.gguf_refusal,
        write_gguf=gguf.write_gguf,
        modelfile=ollama.modelfile,
    )


def default_output(target: Target, *, ref: str, fmt: str, flag: str) -> Path:
    """NAME-hf or NAME-DTYPE.gguf in the current directory (see --output)."""
    name = _name(target, ref)
    return Path(f"{name}-hf") if fmt == "hf" else Path(f"{name}-{flag}.gguf")


def _name(target: Target, ref: str) -> str:
    if target.run is not None:
        name = target.run.resolve().name
        return f"{name}-{target.checkpoint}" if target.checkpoint else name
    path = Path(ref).expanduser()
    if not path.exists():  # a Hub id: its name without the organisation
        return ref.rstrip("/").rsplit("/", 1)[-1]
    path = path.resolve()
    while path.name in FINAL_NAMES and path.parent != path:
        path = path.parent
    return path.name or "model"


def _reads(target: Target) -> list[Path]:
    """The local paths an export of `target` reads."""
    named = [target.run, target.path, target.base, target.tokenizer]
    return [Path(p) for p in named if p is not None and Path(p).exists()]


def _check_outputs(outs: list[Path], *, fmt: str, overwrite: bool, target: Target) -> None:
    from tuneplex.export.output import GGUF_MAGIC, check_apart, check_directory, check_file

    for out in outs:
        check_apart(out, reads=_reads(target))
    if fmt == "hf":
        check_directory(outs[0], overwrite=overwrite)
        return
    check_file(outs[0], overwrite=overwrite, magic=GGUF_MAGIC)
    for other in outs[1:]:
        check_file(other, overwrite=overwrite)


def _work_dtype(fmt: str, flag: str, source: str) -> str:
    if fmt == "hf":
        from tuneplex.export.hf import HF_DTYPES

        return HF_DTYPES[flag]
    return GGUF_IN_TORCH.get(flag, source)


def _plan(target: Target, *, fmt: str, flag: str, out: Path) -> str:
    what = f"adapter merged into {target.base}" if target.adapter else "whole model"
    return f"exporting {target.label} ({what}) as {fmt} {flag} to {out}"


def _write_gguf(gguf, merged, tmps: list[Path], *, out: Path, flag: str):
    """(the writer's report, notes) with the GGUF at tmps[0] and the Modelfile at tmps[1]."""
    report = gguf.write_gguf(
        model=merged.model,
        tokenizer=merged.tokenizer,
        out=tmps[0],
        dtype=flag,
        chat_template=merged.chat_template,
        eos_ids=list(merged.eos_ids),
    )
    report = {**report, "path": str(out)}
    notes = list(report.get("notes") or ())
    if len(tmps) > 1:
        text, note = gguf.modelfile(
            gguf_path=out.resolve(),
            chat_template=merged.chat_template,
            tokenizer=merged.tokenizer,
            eos_ids=list(merged.eos_ids),
        )
        tmps[1].write_text(text, encoding="utf-8")
        if note:
            notes.append(note)
    return report, notes


def _stop_notes(strings: tuple[str, ...], fmt: str) -> list[str]:
    where = "generation_config.json" if fmt == "hf" else "the file"
    return [
        f"the end of turn {s!r} is several tokens: {where} stops at the end-of-sequence token "
        f"only; give {s!r} as a stop string to the runtime"
        for s in strings
    ]


def _tell(report: dict, *, fmt: str, outs: list[Path], notes: list[str]) -> None:
    """What was written, and how to use it."""
    out = outs[0]
    size = _human(report.get("bytes", 0))
    if fmt == "hf":
        typer.echo(f"wrote {out}/ ({report['dtype']}, {size})")
        typer.echo(
            f"use: AutoModelForCausalLM.from_pretrained({str(out)!r}) "
            f"and AutoTokenizer.from_pretrained({str(out)!r}); vllm serve {out}"
        )
    else:
        facts = [size, f"{report['tensors']} tensors" if "tensors" in report else None]
        facts.append(report.get("architecture"))
        typer.echo(f"wrote {out} ({', '.join(f for f in facts if f)})")
        use = f"use: llama-cli -m {out}"
        if len(outs) > 1:
            typer.echo(f"wrote {outs[1]}")
            use += f"; ollama create {out.stem} -f {outs[1]}"
        typer.echo(use)
    for note in notes:
        typer.echo(f"note: {note}", err=True)


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
