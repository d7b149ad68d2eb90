"""The automodel recipe: named setup steps, then the loop (`loop.Loop`), then `final/`.

`train` is the CLI's entry: a job for several processes started outside torchrun launches its
workers there; every process that trains (a launched worker through `train_here`, a worker of
the user's own torchrun, or the one process of a single-process job) runs `train_here`. The
setup steps each return a value the next ones take, and the loop gets them all as one frozen
`Components`, so what a step depends on is what it is handed. What differs between training
types is the job's objective (`objectives.objective_for`), which the steps ask and never name.
"""

from __future__ import annotations

import os
import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneplex.backend import LaunchOptions
from tuneplex.console import note
from tuneplex.data.pipeline import prepare
from tuneplex.errors import TuneplexError
from tuneplex.nn.evaluation import pad_id_of
from tuneplex.nn.models import parameter_counts
from tuneplex.progress import quiet_third_party_logs
from tuneplex.runs import FINAL_DIR, RunHeader, RunRecorder, stopped_early
from tuneplex.signals import Stop, StopSignals

from tuneplex_automodel.final import export_run
from tuneplex_automodel.launch import launch
from tuneplex_automodel.loop import Components, Loop
from tuneplex_automodel.model import (
    apply_lora,
    check_model_ref,
    checkpoint_activations,
    compile_layers,
    load_model,
)
from tuneplex_automodel.objectives import objective_for
from tuneplex_automodel.parallel.mesh import Dist, under_torchrun
from tuneplex_automodel.parallel.mesh import init as init_distributed
from tuneplex_automodel.parallel.parallelize import check_plan, loss_function, parallelize
from tuneplex_automodel.plan import TrainPlan
from tuneplex_automodel.schema import AutomodelJobInput

if TYPE_CHECKING:
    from collections.abc import Callable

    from tuneplex.data.spec import DataSpec

    from tuneplex_automodel.objectives import Objective, Table
    from tuneplex_automodel.parallel import plans
    from tuneplex_automodel.parallel.parallelize import Parallelized
    from tuneplex_automodel.parallel.pp import Pipeline

DEFAULT_SEED = 42
BACKEND = "automodel"


@dataclass
class Runtime:
    """Where this process trains, and in what precision."""

    device: Any
    dtype: Any
    """Dtype the weights are loaded in (frozen base for LoRA, master weights otherwise)."""
    autocast: Any | None
    """Compute dtype under torch.autocast, or None."""
    compiled: bool = False
    """Whether the decoder layers run through torch.compile (`training.compile`)."""

    @property
    def label(self) -> str:
        import torch

        precision = "bf16 mixed" if self.autocast is not None else "fp32"
        if self.compiled:
            precision += ", compiled"
        if self.device.type == "cuda":
            name = torch.cuda.get_device_name(self.device)
            return f"{self.device} ({name}), {precision}"
        return f"{self.device}, {precision}"


def native_bf16(device) -> bool:
    """Whether `device` computes bf16 matmuls natively (else bf16 is emulated and slower)."""
    import torch

    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return False


def pick_runtime(job: AutomodelJobInput, device) -> Runtime:
    """`training.precision`: bf16 mixed precision (full weights: fp32 master weights, bf16
    autocast; LoRA: the frozen base in bf16 too) or fp32; auto = bf16 where it is native."""
    import torch

    precision = job.training.precision
    if precision == "fp32" or (precision == "auto" and not native_bf16(device)):
        return Runtime(device=device, dtype=torch.float32, autocast=None)
    lora = job.training.finetuning_type != "all_weights"
    return Runtime(
        device=device,
        dtype=torch.bfloat16 if lora else torch.float32,
        autocast=torch.bfloat16,
    )


@dataclass(frozen=True)
class Data:
    """The prepared data as the loop reads it."""

    train_rows: Table
    """The items the plan iterates: the objective's tables of the prepared rows."""
    val_rows: Table | None
    tokenizer: Any
    pad_id: int
    stats: dict[str, Any]
    """The summary header's `data` entry: what preparing the splits kept and dropped."""


@dataclass(frozen=True)
class LoadedModel:
    """The model as this rank trains it, before any parallelism is applied."""

    model: Any
    base_dtype: Any
    """The dtype the checkpoint declares (or None): the dtype `final/` is saved in."""
    model_class: str
    """The architecture's class, named before any wrapping hides it."""
    stage: Any
    """This rank's pipeline stage (the module whose forward runs), or None."""
    family: plans.Family | None


# -- entry points ------------------------------------------------------------------------------
def train(
    job: AutomodelJobInput,
    run_dir: Path,
    *,
    resume: bool,
    data_spec: DataSpec,
    launch_options: LaunchOptions,
) -> dict | None:
    """Train `job` into `run_dir`; returns the summary (also written to summary.json) on rank 0.

    A job for several processes, started outside torchrun, launches its workers here (with
    `launch_options`) and waits for them; each worker trains through `train_here`. Under a
    torchrun of the user's own, this runs in every worker and trains here.
    """
    quiet_third_party_logs()
    dims = job.parallel_dims()
    if dims.world_size > 1 and not under_torchrun():
        _check_model_refs(job, objective=objective_for(job))
        launch(dims, job.to_private_dict(), run_dir, resume=resume, options=launch_options)
        return None
    return train_here(job, run_dir, resume=resume, data_spec=data_spec)


def train_here(
    job: AutomodelJobInput, run_dir: Path, *, resume: bool, data_spec: DataSpec
) -> dict | None:
    """Train in this process (one rank of the job); never launches. A stop while setting up
    leaves nothing worth saving: it ends the run at once, saying how to start again."""
    objective = objective_for(job)
    _check_model_refs(job, objective=objective)
    import torch

    dims = job.parallel_dims()
    with StopSignals(say=note if os.environ.get("RANK", "0") == "0" else None) as stop:
        dist = None
        try:
            dist = init_distributed(dims, cuda=torch.cuda.is_available())
            return _train(
                job,
                run_dir,
                resume=resume,
                data_spec=data_spec,
                objective=objective,
                dist=dist,
                stop=stop,
            )
        except Stop as exc:  # while setting up: nothing worth saving yet
            raise stopped_early(run_dir, backend=BACKEND, signum=exc.signum) from None
        except TuneplexError:
            raise
        except Exception:
            if stop.signum and dims.world_size > 1:  # a peer that stopped first left a collective
                raise stopped_early(run_dir, backend=BACKEND, signum=stop.signum) from None
            raise
        finally:
            if dist is not None:
                dist.close()


def _check_model_refs(job: AutomodelJobInput, *, objective: Objective) -> None:
    """In one line, before any data work: a model reference that cannot load (the objective's
    own first)."""
    for key, ref in objective.models:
        check_model_ref(ref, key=key)
    check_model_ref(job.model)


# -- the recipe --------------------------------------------------------------------------------
def _train(
    job: AutomodelJobInput,
    run_dir: Path,
    *,
    resume: bool,
    data_spec: DataSpec,
    objective: Objective,
    dist: Dist,
    stop: StopSignals,
) -> dict | None:
    data = setup_data(data_spec, dist=dist, objective=objective)
    runtime = pick_runtime(job, dist.device)
    seed = seed_everything(job)
    loaded = setup_model(job, dist=dist, runtime=runtime, data=data, objective=objective)
    layout, loss = setup_parallel(
        loaded, dist=dist, pad_id=data.pad_id, separate_head=objective.separate_head
    )
    loaded.model.train()
    optimizer = setup_optimizer(job, model=loaded.model, runtime=runtime)
    plan = setup_plan(job, n_rows=len(data.train_rows), seed=seed, dist=dist, objective=objective)
    pipe = setup_pipeline(job, stage=loaded.stage, dist=dist, data=data)
    counts = count_parameters(loaded.model, dist=dist)
    recorder = RunRecorder(
        run_dir,
        backend=BACKEND,
        job=job,
        main=dist.is_main,
        device_type=runtime.device.type,
        header=run_header(
            job,
            model_class=loaded.model_class,
            counts=counts,
            data=data,
            dist=dist,
            runtime=runtime,
        ),
    )
    parts = Components(
        job=job,
        run_dir=run_dir,
        runtime=runtime,
        dist=dist,
        model=loaded.model,
        optimizer=optimizer,
        plan=plan,
        objective=objective,
        train_rows=data.train_rows,
        val_rows=data.val_rows,
        pad_id=data.pad_id,
        loss=loss,
        layout=layout,
        recorder=recorder,
        stop=stop,
        pipe=pipe,
    )
    loop = Loop(parts)
    if resume:
        loop.restore()
    for line in opening_lines(parts, model_class=loaded.model_class, counts=counts):
        recorder.say(line)
    stop.defer()  # the loop stops between steps, every rank at the same one
    loop.run()
    final = None
    if loop.step == plan.total_steps:
        final = export_final(parts, loaded=loaded, tokenizer=data.tokenizer, loop=loop)
    dist.barrier()
    summary = recorder.completed(final=final)
    loop.close()
    return summary


# -- setup steps -------------------------------------------------------------------------------
def setup_data(spec: DataSpec, *, dist: Dist, objective: Objective) -> Data:
    """Rank 0 builds the token cache once (saying what it kept and dropped); the other ranks
    then load it. The objective reads the prepared rows as the items it trains on."""
    if dist.is_main:
        prepared = prepare(spec, report=note)
    dist.barrier()
    if not dist.is_main:
        prepared = prepare(spec)
    validation = prepared.validation
    tokenizer = prepared.tokenizer
    train_rows, val_rows = objective.tables(prepared)
    return Data(
        train_rows=train_rows,
        val_rows=val_rows,
        tokenizer=tokenizer,
        pad_id=pad_id_of(tokenizer),
        stats={
            "train": prepared.train.stats.as_dict(),
            "validation": validation.stats.as_dict() if validation else None,
        },
    )


def seed_everything(job: AutomodelJobInput) -> int:
    """Seeds Python, numpy and torch (LoRA's initial adapter comes from torch's generator);
    returns the seed, which also orders the rows of each epoch."""
    import numpy as np
    import torch

    seed = job.schedule.seed if job.schedule.seed is not None else DEFAULT_SEED
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return seed


def setup_model(
    job: AutomodelJobInput, *, dist: Dist, runtime: Runtime, data: Data, objective: Objective
) -> LoadedModel:
    """Load and check the model, add LoRA, the objective's own setup, keep this rank's
    pipeline stage. Checks that refuse the layout come before the work they would waste."""
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    dims = dist.dims
    model, base_dtype = load_model(
        job.model,
        dtype=runtime.dtype,
        device=runtime.device,
        trust_remote_code=job.training.trust_remote_code,
        hidden_dropout=job.training.hidden_dropout,
        attention_dropout=job.training.attention_dropout,
    )
    model_class = type(model).__name__  # before any wrapping hides it
    family = check_plan(model_class, dist_dims=dims)
    if dims.ep > 1:  # before LoRA, which would wrap the experts first
        from tuneplex_automodel.parallel.ep import check_divides

        check_divides(model, ep=dims.ep)
    lora = job.training.lora
    if lora is not None:
        model = apply_lora(
            model,
            rank=lora.rank,
            alpha=lora.alpha,
            target_modules=lora.target_modules,
            dropout=lora.dropout,
            use_dora=lora.use_dora,
        )
    checkpoint_activations(model, mode=job.training.activation_checkpointing)
    runtime.compiled = compile_layers(
        model,
        # an objective that generates keeps the layers eager (shapes change every token)
        setting=False if getattr(objective, "generates", False) else job.training.compile,
        device=runtime.device,
        data_parallel_only=dims.tp == dims.pp == dims.cp == dims.ep == 1,
    )
    objective.setup_model(model, tokenizer=data.tokenizer, runtime=runtime, dist=dist)
    stage = None
    if dims.pp > 1:
        from tuneplex_automodel.parallel.pp import keep_stage

        stage = keep_stage(model, dist=dist, parts=family.stages)
        stage.autocast = runtime.autocast
    return LoadedModel(
        model=model,
        base_dtype=base_dtype,
        model_class=model_class,
        stage=stage,
        family=family,
    )


def setup_parallel(
    loaded: LoadedModel, *, dist: Dist, pad_id: int, separate_head: bool
) -> tuple[Parallelized, Callable[..., Any]]:
    """The job's parallelism applied in place (`separate_head`: the objective calls the output
    head apart, so it is a unit of its own), and the loss that matches it (context
    parallelism computes each rank's share)."""
    layout = parallelize(
        loaded.model,
        dist=dist,
        family=loaded.family,
        separate_head=separate_head,
        root=loaded.stage,
    )
    return layout, loss_function(dist, pad_id=pad_id, separate_head=separate_head)


def setup_optimizer(job: AutomodelJobInput, *, model, runtime: Runtime):
    """Made after parallelism is applied: it holds the sharded parameters. Fused on CUDA and
    CPU (one kernel over all parameters: ~8x faster than the per-tensor loop on a CPU) unless
    plain tensors and DTensors are mixed (tensor parallelism's replicated norms beside its
    sharded weights), which the fused kernel refuses."""
    kinds = {type(p.data) for p in model.parameters() if p.requires_grad}
    o = job.optimizer
    return build_optimizer(
        model,
        name=o.name,
        lr=o.learning_rate,
        weight_decay=o.weight_decay,
        betas=(o.adam_beta1, o.adam_beta2),
        fused=runtime.device.type in ("cuda", "cpu") and len(kinds) == 1,
    )


def build_optimizer(
    model,
    *,
    lr: float,
    weight_decay: float,
    fused: bool,
    name: str = "adamw",
    betas: tuple[float, float] = (0.9, 0.999),
):
    """AdamW (decoupled weight decay) or Adam (weight decay as an L2 term of the gradient);
    no weight decay on biases and norm weights (1-D parameters)."""
    import torch

    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    kind = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam}[name]
    return kind(groups, lr=lr, betas=betas, eps=1e-8, fused=fused or None)


def setup_plan(
    job: AutomodelJobInput, *, n_rows: int, seed: int, dist: Dist, objective: Objective
) -> TrainPlan:
    """The plan over the objective's items: the job's batch sizes, or the objective's own
    (`plan_sizes`: prompts per step, each rank's share at once, for an objective of prompts)."""
    sizes = getattr(objective, "plan_sizes", None)
    global_batch, micro_batch = (
        sizes(dist.dims) if sizes else (job.batch.global_batch_size, job.batch.micro_batch_size)
    )
    return TrainPlan(
        n_rows=n_rows,
        global_batch=global_batch,
        micro_batch=micro_batch,
        epochs=job.schedule.epochs,
        max_steps=job.schedule.max_steps,
        seed=seed,
        val_check_interval=job.schedule.val_check_interval,
        checkpoint_steps=job.output.checkpoint_steps,
        dp_size=dist.dims.dp,
    )


def setup_pipeline(job: AutomodelJobInput, *, stage, dist: Dist, data: Data) -> Pipeline | None:
    """The schedule for this rank's stage (None without pipeline parallelism). Its buffers have
    a fixed shape: the longest row of either split."""
    if stage is None:
        return None
    from tuneplex_automodel.parallel.pp import Pipeline

    train_rows, val_rows = data.train_rows, data.val_rows
    longest = max(int(train_rows.lengths.max()), int(val_rows.lengths.max()) if val_rows else 0)
    return Pipeline(
        stage,
        dist=dist,
        n_microbatches=dist.dims.grad_accum_steps,
        micro=job.batch.micro_batch_size,
        length=longest,
        pad_id=data.pad_id,
    )


# -- opening and closing -----------------------------------------------------------------------
def count_parameters(model, *, dist: Dist) -> tuple[int, int]:
    """(trainable, total) parameters of the whole model; each pipeline stage holds its share."""
    trainable, total = parameter_counts(model)
    if dist.dims.pp > 1:
        import torch

        counts = dist.sum_over_stages(torch.tensor([trainable, total], device=dist.device))
        trainable, total = (int(x) for x in counts.tolist())
    return trainable, total


def run_header(
    job: AutomodelJobInput,
    *,
    model_class: str,
    counts: tuple[int, int],
    data: Data,
    dist: Dist,
    runtime: Runtime,
) -> RunHeader:
    trainable, total = counts
    return RunHeader(
        model=job.model,
        model_class=model_class,
        device=placement(dist, runtime),
        training_type=job.training.training_type,
        finetuning_type=job.training.finetuning_type,
        trainable_parameters=trainable,
        total_parameters=total,
        parallel=dist.dims.as_dict(),
        data=data.stats,
    )


def opening_lines(parts: Components, *, model_class: str, counts: tuple[int, int]) -> list[str]:
    job, plan, dims = parts.job, parts.plan, parts.dist.dims
    trainable, total = counts
    val_rows = parts.val_rows
    unit = parts.objective.unit
    batch_text = getattr(parts.objective, "batch_text", None)
    batch = (
        batch_text(dims)
        if batch_text
        else f"global batch {plan.global_batch} = micro {plan.micro_batch} × accumulation "
        f"{dims.grad_accum_steps}" + (f" × data parallel {dims.dp}" if dims.dp > 1 else "")
    )
    cap = plan.unreached_cap()  # first: a user who expects max_steps to win must see it
    return [
        *([cap] if cap else []),
        f"automodel: {job.model} ({model_class}, {total:,} parameters, "
        f"{trainable:,} trained = {100 * trainable / max(total, 1):.2f}%) on "
        + placement(parts.dist, parts.runtime),
        f"data: {len(parts.train_rows):,} training {unit}"
        + (f", {len(val_rows):,} validation {unit}" if val_rows is not None else "")
        + f"; {plan.total_steps} steps ({plan.steps_per_epoch}/epoch), {batch}",
        f"run directory: {parts.run_dir}",
    ]


def placement(dist: Dist, runtime: Runtime) -> str:
    """The processes and the device, as the header and the first line say them."""
    processes = f"{dist.world_size} processes ({dist.dims.describe()}) on "
    return (processes if dist.world_size > 1 else "") + runtime.label


def export_final(parts: Components, *, loaded: LoadedModel, tokenizer, loop: Loop) -> Any:
    """final/, in the dtype the base checkpoint declares. It is written atomically, so a stop
    abandons it at once; once written, the run is complete and a signal changes nothing."""
    runtime = parts.runtime
    base_dtype = loaded.base_dtype
    final_dtype = base_dtype if base_dtype not in (None, runtime.dtype) else None
    try:
        parts.stop.expedite()
        what = export_run(
            parts.run_dir / FINAL_DIR,
            job=parts.job,
            model=loaded.model,
            tokenizer=tokenizer,
            dist=parts.dist,
            dtype=final_dtype,
        )
    except Stop as exc:
        raise loop.stopped(exc.signum, during="writing final/") from None
    parts.stop.defer()
    return what
