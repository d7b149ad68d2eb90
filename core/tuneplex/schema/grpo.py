"""`training.grpo`: reinforcement learning from rewards, the same block on every backend.

Names and meanings are the v1 hyperparameter object's `grpo` section. Where a v1 default cannot
train, the default is NeMo-RL's / TRL's: `num_generations_per_prompt` 1 gives every completion a
zero advantage (nothing to learn), so the default is 8 (TRL's `num_generations`) and 1 is
refused. What v1 leaves implicit is added: `max_completion_length` (tokens generated per
rollout, TRL's default 256) and `policy_updates_per_step` (μ: optimizer updates on each batch of
rollouts, TRL's `num_iterations`, default 1). The v1 block's `max_grad_norm` is the job's
optimizer `max_grad_norm` (one clipping setting for every training type).

The reward is the `environment`, chosen by `name`: `math` (the completion's final answer against
a reference), `python` (a function of the user's) or `multi` (several, weighted). A python
reward's file and function are checked here without running the file (it runs once, in the
training process, before the model loads).
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Discriminator, Field, Tag, model_validator

from tuneplex.errors import TAGGED_UNION, CrossFieldError, did_you_mean, show
from tuneplex.schema.base import StrictModel


class MathEnvironment(StrictModel):
    """1.0 when the completion's final answer is mathematically equal to the row's reference
    (GSM8K `#### 42`, `\\boxed{}`, plain numbers, fractions; math-verify), else 0.0."""

    name: Literal["math"] = Field(description="The math reward.")
    reference_column: str | None = Field(
        default=None,
        min_length=1,
        description="Column holding each prompt's reference answer; null: the row's own "
        "answer (its completion / output, the column_mapping answer, or a chat row's final "
        "assistant message).",
    )


class PythonEnvironment(StrictModel):
    """A reward function of the user's: `name(prompts, completions, **columns) -> list[float]`
    (the rows' other columns as lists, as TRL calls its reward functions)."""

    name: Literal["python"] = Field(description="A reward function of your own.")
    function: str = Field(
        min_length=1,
        description="path/to/rewards.py:function (relative paths from the working directory, "
        "as the job's data paths) or package.module:function.",
    )


def _name_of(value) -> str | None:
    """The union member a reward mapping asks for: its `name`, as a tag (`name[math]`) that
    error messages leave out of the key path."""
    name = value.get("name") if isinstance(value, dict) else getattr(value, "name", None)
    return f"name[{name}]" if isinstance(name, str) else None


def _named(*models):
    return Annotated[
        Annotated[models[0], Tag(_tag(models[0]))] if len(models) == 1 else _union(models),
        Discriminator(
            _name_of,
            custom_error_type=TAGGED_UNION,
            custom_error_message="unknown name",
            custom_error_context={"key": "name", "choices": [_tag(m)[5:-1] for m in models]},
        ),
    ]


def _tag(model) -> str:
    return f"name[{model.model_fields['name'].annotation.__args__[0]}]"


def _union(models):
    import functools
    import operator

    return functools.reduce(operator.or_, [Annotated[m, Tag(_tag(m))] for m in models])


Single = _named(MathEnvironment, PythonEnvironment)


class MultiEnvironment(StrictModel):
    """Several rewards; the total is their weighted sum, and each is logged apart
    (`reward/<name>`)."""

    name: Literal["multi"] = Field(description="Several rewards, weighted.")
    rewards: list[Single] = Field(min_length=1, description="The rewards ({name: ...} each).")
    weights: list[float] | None = Field(
        default=None,
        description="One weight per reward (negative: a penalty; 0: logged, not trained on); "
        "null: 1.0 each.",
    )

    @model_validator(mode="after")
    def _rules(self) -> MultiEnvironment:
        if self.weights is not None and len(self.weights) != len(self.rewards):
            raise CrossFieldError(
                [("weights", f"{len(self.weights)} weights for {len(self.rewards)} rewards")]
            )
        return self


Environment = _named(MathEnvironment, PythonEnvironment, MultiEnvironment)


class GrpoConfig(StrictModel):
    """`training.grpo`: GRPO settings (names from the hyperparameter object's grpo section)."""

    environment: Environment = Field(
        description="The reward: {name: math}, {name: python, function: file.py:name} or "
        "{name: multi, rewards: [...], weights: [...]}.",
    )
    num_prompts_per_step: int = Field(
        default=1,
        ge=1,
        description="Prompts per optimizer step; samples per step = num_prompts_per_step × "
        "num_generations_per_prompt (the job's batch settings, if given, must agree).",
    )
    num_generations_per_prompt: int = Field(
        default=8,
        ge=1,
        description="Completions sampled per prompt; their rewards are compared within the "
        "group (typical 4-16; 1 teaches nothing and is refused).",
    )
    max_completion_length: int = Field(
        default=256, ge=1, description="Tokens generated per completion at most."
    )
    policy_updates_per_step: int = Field(
        default=1,
        ge=1,
        description="μ: optimizer updates on each batch of rollouts (TRL's num_iterations); "
        "the importance ratio compares with the policy that generated them.",
    )
    normalize_rewards: bool = Field(
        default=True,
        description="Divide each advantage by the standard deviation of its prompt group's "
        "rewards.",
    )
    use_rloo: bool = Field(
        default=True,
        description="Leave-one-out baseline: each completion's baseline is the mean reward of "
        "the other completions of its prompt (false: the whole group's mean, as in the GRPO "
        "paper).",
    )
    overlong_filtering: bool = Field(
        default=False,
        description="Completions cut by max_completion_length get no loss (they still count in "
        "their group's baseline).",
    )
    ref_policy_kl_penalty: float = Field(
        default=0.01,
        ge=0,
        description="β: weight of the k3 KL to the reference (the starting model); 0: no "
        "reference pass at all.",
    )
    ratio_clip_min: float = Field(
        default=0.2, ge=0, lt=1, description="ε low: the ratio is clipped below at 1 - ε."
    )
    ratio_clip_max: float = Field(
        default=0.2, ge=0, description="ε high: the ratio is clipped above at 1 + ε."
    )
    ratio_clip_c: float | None = Field(
        default=None,
        gt=1,
        description="Dual clip for negative advantages (typically 3); null: off.",
    )
    use_on_policy_kl_approximation: bool = Field(
        default=False,
        description="Weight the KL per token by the importance ratio to the generating policy.",
    )
    use_importance_sampling_correction: bool = Field(
        default=False,
        description="Weight the loss per token by the ratio of the trained policy (before the "
        "update) to the generator's log-probabilities.",
    )
    token_level_loss: bool = Field(
        default=True,
        description="Mean over every completion token of the step (true) or over completions "
        "of their own token means (false, sequence level).",
    )
    logprob_chunk_size: int = Field(
        default=1024,
        ge=1,
        description="Positions per chunk of the output head at most when log-probabilities "
        "are computed (and never more than 2^24 logits a chunk: no full-vocabulary logits "
        "are held).",
    )
    generation_batch_size: int = Field(
        default=32, ge=1, description="Completions generated together in one batch."
    )
    generation_temperature: float = Field(
        default=1.0,
        gt=0,
        le=1,
        description="Sampling temperature of the rollouts (the trained log-probabilities use "
        "the same temperature).",
    )
    generation_top_p: float = Field(
        default=0.9, gt=0, le=1, description="Nucleus sampling of the rollouts; 1.0: off."
    )
    generation_top_k: int | None = Field(
        default=50, ge=1, description="Top-k sampling of the rollouts; null: off."
    )
    generation_pipeline_parallel_size: int = Field(
        default=1,
        ge=1,
        description="Generation runs in the training processes, on their own weights: 1 only "
        "in this version.",
    )
    rollout_log_steps: int = Field(
        default=10,
        ge=1,
        description="Every N steps a few prompts, their completions and rewards go to "
        "rollouts.jsonl in the run directory.",
    )

    @model_validator(mode="after")
    def _rules(self) -> GrpoConfig:
        problems: list[tuple[str, str]] = []
        if self.num_generations_per_prompt == 1:
            problems.append(
                (
                    "num_generations_per_prompt",
                    "1 gives every completion a zero advantage; use 2 or more (typical 4-16)",
                )
            )
        if self.generation_pipeline_parallel_size != 1:
            problems.append(
                (
                    "generation_pipeline_parallel_size",
                    f"{self.generation_pipeline_parallel_size}: generation runs in the training "
                    "processes in this version; set it to 1",
                )
            )
        problems += environment_problems(self.environment, key="environment")
        if problems:
            raise CrossFieldError(problems)
        return self

    @property
    def samples_per_step(self) -> int:
        return self.num_prompts_per_step * self.num_generations_per_prompt


def environment_problems(env, *, key: str) -> list[tuple[str, str]]:
    """Python rewards whose file or function cannot be found, without running any file."""
    if isinstance(env, MultiEnvironment):
        out = []
        for i, each in enumerate(env.rewards):
            out += environment_problems(each, key=f"{key}.rewards.{i}")
        return out
    if isinstance(env, PythonEnvironment):
        problem = python_reward_problem(env.function, base_dir=Path.cwd())
        return [(f"{key}.function", problem)] if problem else []
    return []


def python_reward_problem(spec: str, *, base_dir: Path) -> str | None:
    """What is wrong with `file.py:name` / `module:name`, read without running it, or None."""
    where, _, attr = spec.rpartition(":")
    where, attr = where.strip(), attr.strip()
    if not where or not attr:
        return f"expected path/to/file.py:function or package.module:function (got {show(spec)})"
    if not where.endswith(".py"):
        try:
            found = importlib.util.find_spec(where)
        except (ImportError, ValueError):
            found = None
        # a module's names are known once it runs (in the training process)
        return no_module(where, attr, base_dir=base_dir) if found is None else None
    path = (base_dir / Path(where).expanduser()).resolve()
    if not path.is_file():
        return f"{path}: no such file"
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except SyntaxError as exc:
        return f"{exc.filename}:{exc.lineno}: {exc.msg}"
    except (OSError, ValueError) as exc:
        return f"{path}: cannot be read ({exc})"
    names = _top_level_names(tree)
    if attr in names or "*" in names or names.get("__getattr__"):
        return None
    functions = sorted(n for n, is_def in names.items() if is_def and not n.startswith("_"))
    listing = f"it defines {', '.join(functions)}" if functions else "it defines no functions"
    return f"{path}: no function {show(attr)}; {listing}{did_you_mean(attr, functions)}"


def no_module(name: str, attr: str, *, base_dir: Path) -> str:
    """The refusal of a reward module that cannot be found, pointing at a file of that name
    beside the job (`rewards.py:f` written as `rewards:f`)."""
    beside = base_dir / (name.replace(".", "/") + ".py")
    hint = f"; did you mean '{name.replace('.', '/')}.py:{attr}'?" if beside.is_file() else ""
    return f"no module named {show(name)}{hint}"


def _top_level_names(tree: ast.Module) -> dict[str, bool]:
    """Names bound at the module's top level -> whether a `def` binds them (the others are
    assignments and imports, which may bind a callable too)."""
    names: dict[str, bool] = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names[node.name] = True
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                for n in ast.walk(target):
                    if isinstance(n, ast.Name):
                        names.setdefault(n.id, False)
        elif isinstance(node, ast.Import | ast.ImportFrom):
            for alias in node.names:
                names.setdefault((alias.asname or alias.name).split(".")[0], False)
        elif isinstance(node, ast.If | ast.Try):  # conditional definitions: trust them
            for sub in ast.walk(node):
                if isinstance(sub, ast.FunctionDef | ast.AsyncFunctionDef):
                    names.setdefault(sub.name, True)
                elif isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Store):
                    names.setdefault(sub.id, False)
    return names


def settle_grpo(training, problems: list[tuple[str, str]]) -> GrpoConfig | None:
    """`training.grpo` for `training.training_type`: required (its environment has no default)
    for grpo; refused for any other type."""
    if training.training_type == "grpo":
        if training.grpo is None:
            problems.append(("grpo", "required when training_type is grpo (its environment)"))
        return training.grpo
    if training.grpo is not None:
        problems.append(("grpo", "only used when training_type is grpo"))
    return None


def grpo_batch_problems(
    grpo: GrpoConfig, *, global_batch: int, given: bool, key: str
) -> list[tuple[str, str]]:
    """`key` (the job's samples-per-step setting) against prompts × generations."""
    if given and global_batch != grpo.samples_per_step:
        return [
            (
                key,
                f"{global_batch} contradicts training.grpo: num_prompts_per_step × "
                f"num_generations_per_prompt = {grpo.num_prompts_per_step} × "
                f"{grpo.num_generations_per_prompt} = {grpo.samples_per_step}; leave it out or "
                f"set it to {grpo.samples_per_step}",
            )
        ]
    return []


def reference_setting(grpo: GrpoConfig | None) -> tuple[str | None, bool]:
    """(the reference column the data is checked for, whether every prompt needs one): a math
    reward compares with a reference; the first one's column (null: the row's own answer)."""
    env = grpo.environment if grpo is not None else None
    found = env.rewards if isinstance(env, MultiEnvironment) else [env] if env else []
    maths = [e for e in found if isinstance(e, MathEnvironment)]
    return (maths[0].reference_column, True) if maths else (None, False)
