"""`tuneplex generate`, `chat` and `eval`: using what a run trained, beside its base model."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer

from tuneplex.cli.common import reported
from tuneplex.cli.targets import CheckpointOpt, TargetArg, resolved
from tuneplex.errors import Problem, UsageError

DtypeOpt = Annotated[
    str | None,
    typer.Option(
        "--dtype",
        help="Weights dtype: auto, float32, bfloat16, float16. Default: the run's own "
        "precision, else the model's own dtype.",
    ),
]
MaxNewOpt = Annotated[
    int, typer.Option("--max-new-tokens", min=1, help="Most tokens generated per answer.")
]
TemperatureOpt = Annotated[
    float, typer.Option("--temperature", min=0.0, help="0: greedy; above 0: sampling.")
]
TopPOpt = Annotated[float, typer.Option("--top-p", min=0.0, max=1.0, help="Nucleus sampling.")]
TopKOpt = Annotated[int, typer.Option("--top-k", min=0, help="Top-k sampling (0: off).")]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="Seed for sampling.")]
BatchOpt = Annotated[int, typer.Option("--batch-size", min=1, help="Prompts run together.")]
ColumnsOpt = Annotated[
    str | None,
    typer.Option(
        "--column-mapping",
        help="Rows' columns as prompt parts and answer: question=COL,answer=COL[,context=COL] "
        "(a run's job mapping otherwise).",
    ),
]
MAPPED = ("context", "question", "answer")


def _columns(text: str | None) -> dict[str, str] | None:
    """`question=q,answer=a` -> {"question": "q", "answer": "a"}, checked."""
    if text is None:
        return None
    mapping: dict[str, str] = {}
    for part in text.split(","):
        role, eq, column = (x.strip() for x in part.partition("="))
        if not eq or role not in MAPPED or not column:
            raise UsageError(
                Problem(
                    "--column-mapping",
                    f"{part.strip()!r}: expected ROLE=COLUMN with ROLE one of {', '.join(MAPPED)}",
                )
            )
        mapping[role] = column
    if "answer" not in mapping:
        raise UsageError(Problem("--column-mapping", "needs answer=COLUMN"))
    return mapping


@contextlib.contextmanager
def _loaded(
    target: str, *, checkpoint: str | None, dtype: str | None, columns: str | None = None
) -> Iterator:
    """The target, loaded; a checkpoint's loadable copy lives in a temporary directory for as
    long as the command runs. `columns` (--column-mapping) maps the rows of data files."""
    from dataclasses import replace

    from tuneplex.inference.loading import DTYPES, load, pick_device

    if dtype is not None and dtype not in DTYPES:
        raise UsageError(Problem("--dtype", f"{dtype!r}: choose from {', '.join(DTYPES)}"))
    mapping = _columns(columns)
    device = pick_device()
    with resolved(target, checkpoint=checkpoint, device=device) as found:
        if mapping is not None:
            found = replace(
                found, spec=replace(found.spec, column_mapping=mapping, format="column_mapped")
            )
        yield load(found, device=device, dtype=dtype)


def _sampling(max_new_tokens: int, temperature: float, top_p: float, top_k: int, seed):
    from tuneplex.inference.engine import Sampling

    return Sampling(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
    )


@reported
def generate_cmd(
    target: TargetArg,
    prompts: Annotated[
        list[str] | None, typer.Argument(help="Prompts, each one user turn.")
    ] = None,
    file: Annotated[
        Path | None,
        typer.Option("--file", help="Rows in any training format: each row's prompt is asked."),
    ] = None,
    system: Annotated[str | None, typer.Option("--system", help="A system turn first.")] = None,
    column_mapping: ColumnsOpt = None,
    checkpoint: CheckpointOpt = None,
    dtype: DtypeOpt = None,
    max_new_tokens: MaxNewOpt = 256,
    temperature: TemperatureOpt = 0.0,
    top_p: TopPOpt = 1.0,
    top_k: TopKOpt = 0,
    seed: SeedOpt = None,
    batch_size: BatchOpt = 8,
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON object per line: prompt, completion, tokens.")
    ] = False,
) -> None:
    """Answer prompts with a run's model, rendered exactly as training rendered them; greedy
    unless --temperature is above 0. Stops at the end-of-turn token the template trained."""
    if not prompts and file is None:
        raise UsageError(Problem("generate", "give prompts, or --file with rows"))
    if file is not None and system is not None:
        raise UsageError(Problem("--system", "rows of --file carry their own system turns"))
    sampling = _sampling(max_new_tokens, temperature, top_p, top_k, seed)
    with _loaded(target, checkpoint=checkpoint, dtype=dtype, columns=column_mapping) as loaded:
        prompter, generator = loaded.engine()
        asked = [prompter.from_text(p, system=system) for p in prompts or ()]
        if file is not None:
            asked += prompter.from_file(file)
        with _bar(len(asked), show=file is not None) as advance:
            done = generator.generate(
                [p.ids for p in asked], sampling, batch_size=batch_size, progress=advance
            )
    for prompt, answer in zip(asked, done, strict=True):
        if as_json:
            row = {
                "prompt": prompt.text,
                "completion": answer.text,
                "completion_tokens": len(answer.ids),
            }
            if prompt.reference is not None:
                row["reference"] = prompt.reference
            typer.echo(json.dumps(row, ensure_ascii=False))
        elif len(asked) == 1:
            typer.echo(answer.text)
        else:
            typer.echo(f"> {prompt.text}\n{answer.text}\n")


@contextlib.contextmanager
def _bar(total: int, *, show: bool):
    """A progress bar on a terminal's stderr (for files); `advance(n)` moves it."""
    if not show or not sys.stderr.isatty():
        yield None
        return
    from rich.progress import Progress

    with Progress(transient=True) as progress:
        task = progress.add_task("generating", total=total)
        yield lambda n: progress.advance(task, n)


@reported
def chat_cmd(
    target: TargetArg,
    system: Annotated[str | None, typer.Option("--system", help="A system turn first.")] = None,
    checkpoint: CheckpointOpt = None,
    dtype: DtypeOpt = None,
    max_new_tokens: MaxNewOpt = 256,
    temperature: TemperatureOpt = 0.0,
    top_p: TopPOpt = 1.0,
    top_k: TopKOpt = 0,
    seed: SeedOpt = None,
) -> None:
    """Chat with a run's model: the whole conversation is rendered with the template each turn.
    /reset, /system TEXT, /exit. Without a terminal: one message per input line, one reply per
    output line (line breaks in a reply written as \\n)."""
    from tuneplex.inference.chat import Conversation

    sampling = _sampling(max_new_tokens, temperature, top_p, top_k, seed)
    with _loaded(target, checkpoint=checkpoint, dtype=dtype) as loaded:
        prompter, generator = loaded.engine()
        if not prompter.chat:
            raise UsageError(Problem(target, "chat needs a chat template; use generate instead"))
        talk = Conversation(prompter, generator, sampling=sampling, system=system)
        if sys.stdin.isatty():
            _interactive(talk, label=loaded.target.label)
        else:
            _scripted(talk)


def _interactive(talk, *, label: str) -> None:
    typer.echo(f"chatting with {label}; /reset, /system TEXT, /exit", err=True)
    while True:
        try:
            line = input("you> ")
        except (EOFError, KeyboardInterrupt):
            typer.echo("", err=True)
            return
        handled = _command(talk, line)
        if handled == "exit":
            return
        if handled or not line.strip():
            continue
        try:
            sys.stdout.write("model> ")
            talk.reply(line, on_text=lambda t: (sys.stdout.write(t), sys.stdout.flush()))
            sys.stdout.write("\n")
        except KeyboardInterrupt:  # stops this answer; the conversation goes on without it
            sys.stdout.write("\n")
            talk.drop_last()
        except UsageError as exc:  # the template refuses this conversation: say so, go on
            sys.stdout.write("\n")
            typer.echo(exc.lines()[0], err=True)
            talk.drop_last()
        sys.stdout.flush()


def _command(talk, line: str) -> str | None:
    """ "done" for a command done (an unknown one said in one line), "exit" for /exit, None
    for a message to the model."""
    try:
        return "done" if talk.command(line) else None
    except UsageError as exc:
        typer.echo(exc.lines()[0], err=True)
        return "done"
    except EOFError:
        return "exit"


def _scripted(talk) -> None:
    for raw in sys.stdin:
        line = raw.rstrip("\n")
        handled = _command(talk, line)
        if handled == "exit":
            return
        if handled:
            continue
        answer = talk.reply(line)
        typer.echo(answer.replace("\\", "\\\\").replace("\n", "\\n"))


@reported
def eval_cmd(
    target: TargetArg,
    data: Annotated[
        Path | None,
        typer.Option("--data", help="Rows in a training format: loss, perplexity, metrics."),
    ] = None,
    baseline: Annotated[
        bool, typer.Option("--baseline", help="Evaluate the base model too, side by side.")
    ] = False,
    metrics: Annotated[
        list[str] | None,
        typer.Option(
            "--metrics",
            help="Answers scored against each row's reference: exact_match, contains, "
            "token_f1, math (comma-separated or repeated). Default: exact_match, token_f1.",
        ),
    ] = None,
    no_generate: Annotated[
        bool, typer.Option("--no-generate", help="Loss and perplexity only (no answers).")
    ] = False,
    samples: Annotated[
        int, typer.Option("--samples", min=0, help="Show N rows: prompt, reference, answers.")
    ] = 0,
    lm_eval: Annotated[
        str | None,
        typer.Option(
            "--lm-eval",
            help="lm-evaluation-harness tasks (comma-separated names, or task YAML files).",
        ),
    ] = None,
    lm_eval_limit: Annotated[
        int | None, typer.Option("--lm-eval-limit", min=1, help="Rows per harness task.")
    ] = None,
    column_mapping: ColumnsOpt = None,
    checkpoint: CheckpointOpt = None,
    dtype: DtypeOpt = None,
    max_new_tokens: MaxNewOpt = 256,
    batch_size: BatchOpt = 8,
    as_json: Annotated[
        bool, typer.Option("--json", help='One object: {"model": {...}, "baseline": {...}}.')
    ] = False,
) -> None:
    """Measure a run's model on a data file (loss with the training masks, perplexity, answers
    against references) and, with --baseline, its base model the same way. A run keeps the
    report (evals/ in the run; `tuneplex runs show` lists the latest)."""
    from tuneplex.inference import report

    chosen = report.metric_names(metrics, generate=not no_generate)
    if data is None and lm_eval is None:
        raise UsageError(Problem("eval", "give --data F (rows with answers) or --lm-eval TASKS"))
    harness_tasks = report.harness_tasks(lm_eval)
    opts = report.EvalOptions(
        data=data,
        metrics=chosen,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        harness_tasks=harness_tasks,
        harness_limit=lm_eval_limit,
        dtype=dtype,
    )
    with _loaded(target, checkpoint=checkpoint, dtype=dtype, columns=column_mapping) as loaded:
        result = report.evaluate_target(loaded, opts, baseline=baseline)
    saved = report.save(loaded.target, result, opts) if loaded.target.run is not None else None
    if as_json:
        typer.echo(json.dumps(result.as_json()))
    else:
        for line in result.lines(samples=samples):
            typer.echo(line)
        if saved is not None:
            typer.echo(f"report: {saved}")
