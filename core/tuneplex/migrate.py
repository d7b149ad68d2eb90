"""`tuneplex migrate`: a v1 hyperparameter object as the tuneplex job that runs what it ran.

Every v1 field becomes a key of the chosen backend's job, or a line saying why it cannot. Where
the file leaves a field out, v1's default is what the v1 job ran, so it is written whenever the
backend's default differs. Targets are looked up in the live job schema (from the plugin
registry), never assumed: a key this version lacks is reported, not written, and the finished
job is validated, any key the schema still refuses being taken out again with its reason.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tuneplex.errors import InternalError, UsageError
from tuneplex.migrate_targets import hf_targets, model_layers
from tuneplex.schema.base import choices, has_key, key_default, ordered
from tuneplex.schema.loading import placeholder, placeholder_problems
from tuneplex.schema.v1 import V1Dpo, V1Grpo, V1Hyperparameters, V1Lora, V1Sft

BACKENDS = ("automodel", "unsloth")
CARRIED, IGNORED, LOST, FILL = "carried", "ignored", "lost", "fill"
Kind = Literal["carried", "ignored", "lost", "fill"]


def _both(path: str) -> dict[str, str]:
    return dict.fromkeys(BACKENDS, path)


# v1 key -> its key in each backend's job, or (None, why the backend has no such setting)
RENAMES: dict[str, dict[str, str | tuple[None, str]]] = {
    "epochs": _both("schedule.epochs"),
    "seed": _both("schedule.seed"),
    "warmup_steps": {"automodel": "optimizer.warmup_steps", "unsloth": "schedule.warmup_steps"},
    "learning_rate": _both("optimizer.learning_rate"),
    "weight_decay": _both("optimizer.weight_decay"),
    "log_every_n_steps": {
        "automodel": (None, "automodel records every optimizer step in metrics.jsonl"),
        "unsloth": "schedule.logging_steps",
    },
    "sequence_packing_enabled": {
        "automodel": "batch.sequence_packing",
        "unsloth": "dataset.packing",
    },
    "sft.hidden_dropout": _both("training.hidden_dropout"),
    "sft.attention_dropout": _both("training.attention_dropout"),
    "lora.adapter_dim": _both("training.lora.rank"),
    "lora.alpha": _both("training.lora.alpha"),
    "lora.adapter_dropout": _both("training.lora.dropout"),
    "distillation.teacher": {
        "automodel": "training.teacher_model",
        "unsloth": (None, "the unsloth backend has no distillation"),
    },
}
INPUTS = {  # what the v1 object lacks: --flag -> (its key in each backend's job, placeholder)
    "--model": (
        {"automodel": "model", "unsloth": "model.name"},
        "model: a local directory or Hugging Face id",
    ),
    "--training-data": (
        {"automodel": "dataset.training", "unsloth": "dataset.path"},
        "training data: a data file, a directory of them or a Hugging Face dataset id",
    ),
    "--validation-data": (
        {"automodel": "dataset.validation", "unsloth": "dataset.validation_path"},
        None,
    ),
}
STAND_INS = {"model": "org/model", "dataset": "data.jsonl", "teacher": "org/teacher"}
"""Valid values put where placeholders are while the written job is checked."""
IMPLICIT = {
    ("automodel", "optimizer.name"): "adamw",
    ("automodel", "optimizer.lr_schedule"): "cosine",
    ("automodel", "optimizer.adam_beta1"): 0.9,
    ("automodel", "optimizer.adam_beta2"): 0.999,
    ("unsloth", "optimizer.adam_beta1"): 0.9,
    ("unsloth", "optimizer.adam_beta2"): 0.999,
}
"""What a backend does where its schema has no key for it (torch's and HF's AdamW betas;
automodel's AdamW with cosine decay to 0.1 × the learning rate): a v1 value equal to it needs
no key."""
MIN_LR_RATIO = 0.1
"""v1's min_learning_rate when not given (or 0): 0.1 × learning_rate; automodel's too."""
HF_SCHEDULES = {"cosine": "cosine", "flat": "constant_with_warmup"}
REWARDS = ("math", "python", "multi")
REWARD = "reward: {name: math}, {name: python, function: file.py:name} or {name: multi, ...}"


@dataclass(frozen=True)
class Line:
    """What one v1 field (or flag) became: carried to a key, ignored (as v1 ignored it), lost
    (no equivalent, and why), or a placeholder to fill."""

    key: str
    kind: Kind
    text: str


MARKS = {CARRIED: "->", LOST: "not carried:", IGNORED: "ignored, as v1 did:", FILL: "to fill:"}


@dataclass(frozen=True)
class Migration:
    backend: str
    job: dict[str, Any]
    lines: tuple[Line, ...]

    @property
    def lost(self) -> list[Line]:
        return [line for line in self.lines if line.kind == LOST]

    def report(self) -> list[str]:
        """One aligned line per field, then the counts."""
        width = max((len(line.key) for line in self.lines), default=0)
        out = [f"  {line.key:<{width}}  {MARKS[line.kind]} {line.text}" for line in self.lines]
        count = {k: sum(line.kind == k for line in self.lines) for k in MARKS}
        fill = len(placeholder_problems(self.job))
        out.append(
            f"{count[CARRIED]} carried, {count[LOST]} not carried, {count[IGNORED]} ignored as "
            f"v1 ignored them; {fill} placeholder{'' if fill == 1 else 's'} to fill"
        )
        return out

    def yaml(self, *, source: str) -> str:
        import yaml

        class Dumper(yaml.SafeDumper):  # sections in block style, lists of values in one line
            def represent_list(self, data):
                flow = all(not isinstance(v, dict | list) for v in data)
                return self.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)

        Dumper.add_representer(list, Dumper.represent_list)
        head = f"# {self.backend} job: `tuneplex migrate` of the v1 hyperparameters in {source}\n"
        if placeholder_problems(self.job):
            head += "# replace every <your ...> value; `tuneplex validate` names those left\n"
        body = yaml.dump(self.job, Dumper=Dumper, sort_keys=False, width=100)
        return head + body


def migrate(
    v1: V1Hyperparameters,
    *,
    backend: str,
    schema: type,
    model: str | None = None,
    training_data: str | None = None,
    validation_data: str | None = None,
) -> Migration:
    """The job for `backend` (its live `schema`) that runs what `v1` ran, and what each field
    became. A training type the backend lacks is refused (UsageError)."""
    if backend not in BACKENDS:
        raise UsageError(f"--backend: migrate writes {' or '.join(BACKENDS)} jobs (got {backend})")
    b = _Build(v1=v1, backend=backend, schema=schema)
    b.inputs(model=model, training_data=training_data, validation_data=validation_data)
    _method(b)
    _schedule(b)
    _validation(b, training_data=training_data, validation_data=validation_data)
    _batch(b)
    _optimizer(b)
    _blocks(b, model=model)
    b.settle()
    return Migration(backend=backend, job=ordered(b.job, schema), lines=tuple(b.lines))


def shown(value: Any, *, limit: int = 90) -> str:
    """A value as the report prints it: YAML's flow style, cut to `limit` characters."""
    if isinstance(value, bool) or value is None:
        text = {True: "true", False: "false", None: "null"}[value]
    elif isinstance(value, list):
        text = "[" + ", ".join(shown(v) for v in value) + "]"
    elif isinstance(value, dict):
        text = "{" + ", ".join(f"{k}: {shown(v)}" for k, v in value.items()) + "}"
    else:
        text = str(value)
    return text if len(text) <= limit else f"{text[: limit - 4]}...{text[-1]}"


# --- building the job -----------------------------------------------------------------------
_NULLABLE = {"generation_top_k", "ratio_clip_c"}
"""v1 block keys whose null is a setting (off), not a key left out."""
_BLOCKS = {"sft": V1Sft, "dpo": V1Dpo, "grpo": V1Grpo, "lora": V1Lora, "distillation": None}


@dataclass
class _Build:
    v1: V1Hyperparameters
    backend: str
    schema: type
    job: dict[str, Any] = field(default_factory=dict)
    lines: list[Line] = field(default_factory=list)
    sources: dict[str, str] = field(default_factory=dict)  # written key -> the field it carries
    stand_ins: dict[str, Any] = field(default_factory=dict)  # placeholder key -> a valid value

    def get(self, key: str) -> tuple[Any, bool]:
        """(value, written in the file) of a dotted v1 key; v1's default when not written."""
        head, _, name = key.rpartition(".")
        if not head:
            value = getattr(self.v1, name)
            given = name in self.v1.model_fields_set and value is not None
            return (value if given else self.v1.default(name)), given
        block, model = getattr(self.v1, head), _BLOCKS[head]
        if block is not None:
            value = getattr(block, name)
            if name in block.model_fields_set and (value is not None or name in _NULLABLE):
                return value, True
        spec = model.model_fields[name] if model else None
        return (None if spec is None or spec.is_required() else spec.default), False

    def say(self, key: str, kind: Kind, text: str) -> None:
        self.lines.append(Line(key, kind, text))

    def miss(self, key: str, value: Any, why: str, *, kind: Kind = LOST) -> None:
        """A field not carried (or ignored, as v1 ignored it): its value, and why."""
        self.say(key, kind, f"{shown(value)} ({why})")

    def put(self, path: str, value: Any, *, source: str) -> None:
        _set(self.job, path, value)
        self.sources[path] = source

    def carry(self, key: str, targets: dict[str, Any], *, given: bool, note: str = "") -> None:
        """Write `targets` for `key`, with one line; v1's default is left out where it is the
        backend's (no line). A key this version lacks loses the field, unless the backend
        does that value anyway."""
        absent = {p: v for p, v in targets.items() if not has_key(self.schema, p)}
        default = "" if given else ", v1's default"
        for path, value in absent.items():
            if IMPLICIT.get((self.backend, path), ...) != value:
                why = f"{path} has no equivalent in this version{default}"
                self.miss(key, value if len(targets) > 1 else self.get(key)[0], why)
                return
        write = {p: v for p, v in targets.items() if p not in absent}
        if not given:
            write = {p: v for p, v in write.items() if key_default(self.schema, p) != v}
            if not write:
                return
        for path, value in write.items():
            self.put(path, value, source=key)
        said = [f"{p}: {shown(v)}" for p, v in write.items()]
        if absent:
            done = ", ".join(shown(v) for v in absent.values())
            said.append(f"{done}: what {self.backend} does without a key for it")
        notes = [n for n in ("" if given else "v1 default, not in the file", note) if n]
        self.say(key, CARRIED, ", ".join(said) + (f" ({'; '.join(notes)})" if notes else ""))

    def rename(self, key: str) -> None:
        """A v1 field whose value carries over unchanged to its RENAMES key."""
        value, given = self.get(key)
        if value is None and not given:
            return
        target = RENAMES[key][self.backend]
        if not isinstance(target, tuple):
            self.carry(key, {target: value}, given=given)
        elif given:
            self.miss(key, value, f"no equivalent: {target[1]}")

    def inputs(self, **given: str | None) -> None:
        for flag, (paths, what) in INPUTS.items():
            value = given[flag[2:].replace("-", "_")]
            path = paths[self.backend]
            if value is not None:
                self.put(path, value, source=flag)
                self.say(flag, CARRIED, f"{path}: {shown(value)}")
            elif what is not None:
                self.fill(flag, path, what, stand_in=STAND_INS[path.split(".")[0]])

    def fill(self, key: str, path: str, what: str, *, stand_in: Any, why: str = "") -> None:
        """A placeholder at `path`; with `why`, in place of a v1 value that cannot be carried."""
        self.put(path, placeholder(what), source=key)
        self.stand_ins[path] = stand_in
        text = f"{path}: a placeholder for your {what.split(':')[0]}"
        text += f" (or pass {key})" if key.startswith("--") else ""
        self.say(key, LOST if why else FILL, f"{why}; {text}" if why else text)

    def settle(self) -> None:
        """Validate the written job (placeholders replaced by stand-ins); a key the schema
        still refuses is taken out and its field reported with the schema's reason."""
        from tuneplex.schema.loading import validate_job

        for _ in range(len(self.sources) + 1):
            trial = json.loads(json.dumps(self.job))
            for path, value in self.stand_ins.items():
                _set(trial, path, value)
            try:
                validate_job(self.schema, trial)
                return
            except UsageError as exc:
                problems = exc.problems
            dropped = False
            for problem in problems:
                where = re.sub(r"\[\d+\]", "", problem.where)
                for path in [p for p in self.sources if _overlaps(p, where)]:
                    if path in self.sources:  # not dropped with another key of its field
                        self._drop(path, problem)
                        dropped = True
            if not dropped:
                raise InternalError([f"migrate wrote an invalid job: {p}" for p in problems])

    def _drop(self, path: str, problem) -> None:
        source = self.sources[path]
        value = _get(self.job, path)
        for each in [p for p, s in self.sources.items() if s == source]:
            del self.sources[each]
            _unset(self.job, each)
            self.stand_ins.pop(each, None)
        why = problem.message if problem.where == path else str(problem)
        for i, line in enumerate(self.lines):
            if line.key == source and line.kind in (CARRIED, FILL):
                default = ", v1's default" if "v1 default" in line.text else ""
                self.lines[i] = Line(source, LOST, f"{shown(value)} ({path}: {why}{default})")


def _overlaps(path: str, where: str) -> bool:
    return path == where or where.startswith(path + ".") or path.startswith(where + ".")


def _get(data: dict[str, Any], path: str) -> Any:
    for part in path.split("."):
        data = data[part]
    return data


def _set(data: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split(".")
    for part in parents:
        data = data.setdefault(part, {})
    data[last] = value


def _unset(data: dict[str, Any], path: str) -> None:
    """Remove `path` and the sections it leaves empty."""
    head, _, last = path.rpartition(".")
    parent = _get(data, head) if head else data
    parent.pop(last, None)
    if head and not parent:
        _unset(data, head)


# --- the fields ------------------------------------------------------------------------------
def _method(b: _Build) -> None:
    kind, given = b.get("training_type")
    allowed = choices(b.schema, "training.training_type")
    if kind not in allowed:
        raise UsageError(
            f"training_type: {kind}: the {b.backend} backend has no {kind} (it trains "
            f"{', '.join(allowed)}); use --backend automodel"
        )
    b.carry("training_type", {"training.training_type": kind}, given=given)
    ft, _ = b.get("finetuning_type")
    if kind == "distillation" and ft != "all_weights":
        b.put("training.finetuning_type", "all_weights", source="finetuning_type")
        b.miss("finetuning_type", ft, "tuneplex distils into full weights only; all_weights")
    elif b.backend == "unsloth":
        merged = {"output.save_method": "merged_16bit"} if ft == "lora_merged" else {}
        targets = {"training.finetuning_type": "lora" if merged else ft, **merged}
        # unsloth loads in 4 bits unless told (QLoRA), and full weights must not
        targets["model.load_in_4bit"] = False
        b.carry("finetuning_type", targets, given=True, note="v1 trained 16-bit weights")
    else:
        b.carry("finetuning_type", {"training.finetuning_type": ft}, given=True)


def _schedule(b: _Build) -> None:
    b.rename("epochs")
    steps, given = b.get("max_steps")
    if given and steps > 0:
        note = "HF's overrides epochs; v1's stops at whichever comes first"
        b.carry("max_steps", {"schedule.max_steps": steps}, given=True, note=note * _hf(b))
    elif given:
        b.say("max_steps", CARRIED, f"schedule.max_steps: none ({steps}: no cap, as in v1)")
    b.rename("seed")
    b.rename("warmup_steps")
    b.rename("log_every_n_steps")


def _hf(b: _Build) -> bool:
    return b.backend == "unsloth"


def _validation(b: _Build, *, training_data: str | None, validation_data: str | None) -> None:
    """v1's val_check_interval: a fraction of an epoch, or a number of batches (steps)."""
    key = "val_check_interval"
    value, given = b.get(key)
    if not given:
        return
    if validation_data is None:
        b.miss(key, value, "validation needs --validation-data")
        return
    per_step = b.get("grpo.num_prompts_per_step" if b.v1.kind == "grpo" else "batch_size")[0]
    spe, why = _steps_per_epoch(training_data, per_step=per_step)
    fraction = isinstance(value, float)
    if spe is None and fraction == _hf(b):
        b.miss(key, value, f"{'eval_steps counts steps' if fraction else 'batches'}: {why}")
    elif not _hf(b):
        note = "" if fraction else f"{value} of {spe} steps per epoch"
        frac = value if fraction else min(1.0, value / spe)
        b.carry(key, {"schedule.val_check_interval": frac}, given=True, note=note)
    elif fraction:
        note = f"{value} of {spe} steps per epoch"
        b.carry(key, {"schedule.eval_steps": max(1, int(value * spe))}, given=True, note=note)
    else:
        steps = min(value, spe) if spe else value
        b.carry(key, {"schedule.eval_steps": steps}, given=True, note="steps")


def _steps_per_epoch(ref: str | None, *, per_step: int) -> tuple[int | None, str]:
    """Optimizer steps per epoch of the local training data, or why they cannot be known."""
    if ref is None:
        return None, "the epoch's size needs --training-data, a local file"
    from tuneplex.data.sources import read_rows, resolve

    try:
        source = resolve(ref, key="--training-data")
        if source.hub_id is not None:
            return None, f"cannot count the rows of {ref}; pass a local file"
        rows = sum(isinstance(row, dict) for _, row in read_rows(source, key="--training-data"))
    except UsageError as exc:
        return None, f"cannot count the rows: {exc.problems[0].message}"
    if rows == 0:
        return None, f"{ref} has no rows"
    return math.ceil(rows / per_step), ""


def _batch(b: _Build) -> None:
    size, given = b.get("batch_size")
    if b.v1.kind == "grpo":
        if given:
            why = "grpo's samples per step are num_prompts_per_step × num_generations_per_prompt"
            b.miss("batch_size", size, why, kind=IGNORED)
    elif not _hf(b):
        note = "micro_batch_size stays 1: v1 has none"
        b.carry("batch_size", {"batch.global_batch_size": size}, given=given, note=note)
    else:
        targets = {
            "batch.per_device_train_batch_size": 1,
            "batch.gradient_accumulation_steps": size,
        }
        note = "1 sample a pass, as v1; raise per_device_train_batch_size if memory allows"
        b.carry("batch_size", targets, given=given, note=note)
    b.rename("sequence_packing_enabled")


def _optimizer(b: _Build) -> None:
    name, given = b.get("optimizer")
    adam, _, schedule = name.partition("_with_")
    schedule = "cosine" if schedule == "cosine_annealing" else "flat"
    if not _hf(b):
        targets = {"optimizer.name": adam, "optimizer.lr_schedule": schedule}
        b.carry("optimizer", targets, given=given)
    else:
        to_min = schedule == "cosine" and _hf_min_lr(b)  # v1's cosine ends at min_learning_rate
        targets = {
            "optimizer.optim": "adamw_torch",
            "schedule.lr_scheduler_type": "cosine_with_min_lr"
            if to_min
            else HF_SCHEDULES[schedule],
        }
        note = "HF has no plain Adam; AdamW is Adam when weight_decay is 0" * (adam == "adam")
        b.carry("optimizer", targets, given=given, note=note)
    b.rename("learning_rate")
    b.rename("weight_decay")
    for key in ("adam_beta1", "adam_beta2", "min_learning_rate"):
        value, given = b.get(key)
        if schedule == "flat" and given:
            b.miss(key, value, "v1 uses it with cosine annealing only", kind=IGNORED)
        elif schedule == "cosine" and key == "min_learning_rate":
            _min_lr(b, value if given and value else None)
        elif schedule == "cosine":
            b.carry(key, {f"optimizer.{key}": value}, given=given)


def _min_lr(b: _Build, value: float | None) -> None:
    """v1's cosine ends at min_learning_rate (not given, or 0: 0.1 × learning_rate)."""
    key, path = "min_learning_rate", "optimizer.min_learning_rate"
    lr, _ = b.get("learning_rate")
    default = float(f"{MIN_LR_RATIO * lr:.12g}")
    note = "" if value else f"v1 default {MIN_LR_RATIO} × learning_rate, not in the file"
    if not _hf(b) and has_key(b.schema, path):
        b.carry(key, {path: value or default}, given=True, note=note)
    elif not _hf(b) and value and not math.isclose(value, default):
        b.miss(key, value, f"{path} has no equivalent in this version: the decay ends at {default}")
    elif not _hf(b):
        pass  # automodel's cosine decay ends at MIN_LR_RATIO × learning_rate, as v1's
    elif _hf_min_lr(b):
        b.carry(key, {path: value or default}, given=True, note=note)
    else:
        why = "HF's cosine schedule in this version decays to 0" + ", v1's default" * (not value)
        b.miss(key, value or default, why)


def _hf_min_lr(b: _Build) -> bool:
    """Whether this unsloth schema has Hugging Face's cosine decay to a minimum rate."""
    scheduler = choices(b.schema, "schedule.lr_scheduler_type")
    return has_key(b.schema, "optimizer.min_learning_rate") and "cosine_with_min_lr" in scheduler


def _blocks(b: _Build, *, model: str | None) -> None:
    kind = b.v1.kind
    ft, _ = b.get("finetuning_type")
    _block(b, "sft", use=kind == "sft", why=f"v1 applies it to sft; training_type is {kind}")
    if ft == "all_weights":
        _block(b, "lora", use=False, why="finetuning_type is all_weights")
    elif kind == "distillation":
        _block(b, "lora", use=False, lost=True, why="distillation trains full weights")
    else:
        _lora(b, model=model)
    _block(b, "distillation", use=kind == "distillation", why=f"training_type is {kind}")
    if kind == "distillation" and b.v1.distillation is None:
        path = RENAMES["distillation.teacher"]["automodel"]
        what = "teacher model: a local directory or Hugging Face id"
        b.fill("distillation.teacher", path, what, stand_in=STAND_INS["teacher"])
    for name in ("dpo", "grpo"):
        _block(b, name, use=kind == name, why=f"training_type is {kind}")


def _block(b: _Build, name: str, *, use: bool, why: str, lost: bool = False) -> None:
    """A v1 block: its keys carried when the training type uses it, else reported."""
    block = getattr(b.v1, name)
    if block is None and (not use or name in ("sft", "distillation")):
        return
    if not use:
        for key in sorted(block.model_fields_set):
            b.miss(f"{name}.{key}", getattr(block, key), why, kind=LOST if lost else IGNORED)
        return
    model = _BLOCKS[name] or type(block)
    for key in model.model_fields:
        value, given = b.get(f"{name}.{key}")
        if name in ("sft", "distillation"):
            b.rename(f"{name}.{key}")
        elif key == "environment":
            _environment(b, value or {})
        elif key == "max_grad_norm":
            b.carry(f"{name}.{key}", {"optimizer.max_grad_norm": value}, given=given)
        else:
            b.carry(f"{name}.{key}", {f"training.{name}.{key}": value}, given=given)


def _environment(b: _Build, env: dict[str, Any]) -> None:
    """v1's environment objects are not specified: a `name` tuneplex knows is carried with
    the keys its reward takes; anything else leaves a placeholder."""
    from pydantic import TypeAdapter, ValidationError

    from tuneplex.errors import format_validation_error
    from tuneplex.schema import grpo

    key, path, stand_in = "grpo.environment", "training.grpo.environment", {"name": "math"}
    name = env.get("name")
    if name not in REWARDS:
        why = f"{shown(name)} (tuneplex's rewards are {', '.join(REWARDS)})" if env else ""
        b.fill(key, path, REWARD, stand_in=stand_in, why=why)
        return
    rewards = {"math": grpo.MathEnvironment, "python": grpo.PythonEnvironment}
    fields = list({**rewards, "multi": grpo.MultiEnvironment}[name].model_fields)
    for extra in sorted(k for k in env if k not in fields):
        b.miss(f"{key}.{extra}", env[extra], f"the {name} reward takes {', '.join(fields)}")
    env = {k: v for k, v in env.items() if k in fields}
    try:
        parsed = TypeAdapter(grpo.Environment).validate_python(env)
    except ValidationError as exc:
        b.fill(key, path, REWARD, stand_in=stand_in, why=str(format_validation_error(exc)[0]))
        return
    b.put(path, env, source=key)
    b.stand_ins[path] = stand_in  # a python reward's file is checked by validate, not here
    found = grpo.environment_problems(parsed, key=path)
    note = f" (validate says {found[0][0]}: {found[0][1]})" if found else ""
    b.say(key, CARRIED, f"{path}: {shown(env)}{note}")


def _lora(b: _Build, *, model: str | None) -> None:
    for key in ("lora.adapter_dim", "lora.alpha", "lora.adapter_dropout"):
        b.rename(key)
    patterns, given = b.get("lora.target_modules")
    if not given:
        return
    key, path = "lora.target_modules", "training.lora.target_modules"
    names, notes, lost = hf_targets(patterns, layers=model_layers(model))
    for pattern, why in lost:
        b.miss(key, pattern, why)
    if names and _hf(b) and any("." in n for n in names):
        notes.append("unsloth runs per-layer names outside its optimised LoRA path")
    if names:
        b.carry(key, {path: names}, given=True, note="; ".join(notes))


def read_v1(path: Path) -> V1Hyperparameters:
    """A v1 hyperparameter file (JSON, or YAML), every problem as `file: key: what`."""
    from pydantic import ValidationError

    from tuneplex.errors import Problem, format_validation_error
    from tuneplex.schema.loading import load_job_file

    data = load_job_file(path)
    try:
        return V1Hyperparameters.model_validate(data)
    except ValidationError as exc:
        problems = format_validation_error(exc, V1Hyperparameters)
        raise UsageError([Problem(f"{path}: {p.where}", p.message) for p in problems]) from None
