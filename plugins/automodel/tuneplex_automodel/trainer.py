"""The automodel training loop: one process on CPU or one CUDA GPU.

Each optimizer step takes `global_batch_size` rows (the last step of an epoch the rows left),
split into micro-batches; the loss is the mean over every counted token of the whole step, so
any split into micro-batches (or data-parallel ranks) gives the same gradient.
"""

from __future__ import annotations

import math
import os
import random
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneplex.backend import LaunchOptions
from tuneplex.console import note
from tuneplex.data.collate import EMPTY_ROW, RowTable, collate
from tuneplex.data.pipeline import prepare
from tuneplex.errors import Interrupted, Problem, TuneplexError, UsageError
from tuneplex.evaluation import evaluate, pad_id_of
from tuneplex.models import parameter_counts, unwrap_peft
from tuneplex.progress import quiet_third_party_logs
from tuneplex.runs import (
    FINAL_DIR,
    RunRecorder,
    checkpoint_path,
    prune_checkpoints,
    resume_checkpoint,
)
from tuneplex.signals import Stop, StopSignals, stopped_early

from tuneplex_automodel.checkpoint import (
    export_run,
    load_checkpoint,
    save_checkpoint,
    stage_merger,
)
from tuneplex_automodel.distill import distill_loss_sums, load_teacher
from tuneplex_automodel.launch import launch
from tuneplex_automodel.model import apply_lora, check_model_ref, load_model
from tuneplex_automodel.parallel.mesh import Dist, clip_grad_norm, under_torchrun
from tuneplex_automodel.parallel.mesh import init as init_distributed
from tuneplex_automodel.parallel.parallelize import check_plan, loss_function, parallelize
from tuneplex_automodel.plan import TrainPlan, learning_rate
from tuneplex_automodel.schema import AutomodelJobInput

DEFAULT_SEED = 42
GRAD_CLIP = 1.0


@dataclass
class Runtime:
    """Where this process trains. One process here; the distributed launcher fills in more."""

    device: Any
    dtype: Any
    """Dtype the weights are loaded in (frozen base for LoRA, master weights otherwise)."""
    autocast: Any | None
    """Compute dtype under torch.autocast, or None."""

    @property
    def label(self) -> str:
        import torch

        if self.device.type == "cuda":
            name = torch.cuda.get_device_name(self.device)
            return f"{self.device} ({name}), bf16"
        return f"{self.device}, fp32"


def pick_runtime(job: AutomodelJobInput, device) -> Runtime:
    """bf16 on a CUDA GPU (full weights: fp32 master weights, bf16 autocast); fp32 on CPU."""
    import torch

    if device.type == "cuda":
        lora = job.training.finetuning_type != "all_weights"
        return Runtime(
            device=device,
            dtype=torch.bfloat16 if lora else torch.float32,
            autocast=torch.bfloat16,
        )
    return Runtime(device=device, dtype=torch.float32, autocast=None)


def train(
    job: AutomodelJobInput,
    run_dir: Path,
    *,
    resume: bool,
    data_spec,
    launch_options: LaunchOptions,
) -> dict | None:
    """Train `job` into `run_dir`; returns the summary (also written to summary.json) on rank 0.

    A job for several processes, started outside torchrun, launches its workers here (with
    `launch_options`) and waits for them (each worker comes back into this function under
    torchrun, where the options have done their work).
    """
    quiet_third_party_logs()
    dims = job.parallel_dims()
    distilling = job.training.training_type == "distillation"
    if distilling:
        check_model_ref(job.training.teacher_model, key="training.teacher_model")
    if dims.world_size > 1 and not under_torchrun():
        check_model_ref(job.model)
        launch(dims, job.to_private_dict(), run_dir, resume=resume, options=launch_options)
        return None
    check_model_ref(job.model)
    import torch

    with StopSignals(say=note if os.environ.get("RANK", "0") == "0" else None) as stop:
        dist = None
        try:
            dist = init_distributed(dims, cuda=torch.cuda.is_available())
            return _train(job, run_dir, resume=resume, data_spec=data_spec, dist=dist, stop=stop)
        except Stop as exc:  # while setting up: nothing worth saving yet
            raise stopped_early(run_dir, signum=exc.signum) from None
        except TuneplexError:
            raise
        except Exception:
            if stop.signum and dims.world_size > 1:  # a peer that stopped first left a collective
                raise stopped_early(run_dir, signum=stop.signum) from None
            raise
        finally:
            if dist is not None:
                dist.close()


def _train(
    job, run_dir: Path, *, resume: bool, data_spec, dist: Dist, stop: StopSignals
) -> dict | None:
    if dist.is_main:  # build the token cache once; the other ranks then load it
        prepared = prepare(data_spec, report=note)
    dist.barrier()
    if not dist.is_main:
        prepared = prepare(data_spec)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    rt = pick_runtime(job, dist.device)
    dims = dist.dims
    seed = job.schedule.seed if job.schedule.seed is not None else DEFAULT_SEED
    _seed_everything(seed)
    tokenizer = prepared.tokenizer
    model, base_dtype = load_model(
        job.model,
        dtype=rt.dtype,
        device=rt.device,
        trust_remote_code=job.training.trust_remote_code,
    )
    family = check_plan(type(model).__name__, dist_dims=dims)
    if dims.ep > 1:  # before LoRA, which would wrap the experts first
        from tuneplex_automodel.parallel.ep import check_divides

        check_divides(model, ep=dims.ep)
    lora = job.training.lora
    if lora is not None:
        model = apply_lora(
            model, rank=lora.rank, alpha=lora.alpha, target_modules=lora.target_modules
        )
    model_class = type(unwrap_peft(model)).__name__  # before wrapping
    teacher = load_teacher(job, student=model, tokenizer=tokenizer, device=rt.device)
    stage = None
    if dims.pp > 1:
        from tuneplex_automodel.parallel.pp import keep_stage

        stage = keep_stage(model, dist=dist, parts=family.stages)
        stage.autocast = rt.autocast
    layout = parallelize(model, dist=dist, separate_head=teacher is not None, root=stage)
    model.train()
    optimizer = build_optimizer(
        model,
        lr=job.optimizer.learning_rate,
        weight_decay=job.optimizer.weight_decay,
        fused=rt.device.type == "cuda",
    )
    train_rows = RowTable(prepared.train.rows)
    val_rows = RowTable(prepared.validation.rows) if prepared.validation is not None else None
    plan = TrainPlan(
        rows=len(train_rows),
        global_batch=job.batch.global_batch_size,
        micro_batch=job.batch.micro_batch_size,
        epochs=job.schedule.epochs,
        max_steps=job.schedule.max_steps,
        seed=seed,
        val_check_interval=job.schedule.val_check_interval,
        checkpoint_steps=job.output.checkpoint_steps,
        dp_size=dims.dp,
    )
    pipe = None
    if stage is not None:
        from tuneplex_automodel.parallel.pp import Pipeline

        longest = max(int(train_rows.lengths.max()), int(val_rows.lengths.max()) if val_rows else 0)
        pipe = Pipeline(
            stage,
            dist=dist,
            n_microbatches=dims.grad_accum_steps,
            micro=job.batch.micro_batch_size,
            length=longest,
            pad_id=pad_id_of(tokenizer),
        )
    rec = RunRecorder(
        run_dir, backend="automodel", job=job, main=dist.is_main, device_type=rt.device.type
    )
    loop = _Loop(
        job=job,
        run_dir=run_dir,
        rec=rec,
        rt=rt,
        dist=dist,
        model=model,
        optimizer=optimizer,
        plan=plan,
        train_rows=train_rows,
        val_rows=val_rows,
        pad_id=pad_id_of(tokenizer),
        teacher=teacher,
        pipe=pipe,
        stop=stop,
        layout=layout,
    )
    if resume:
        loop.restore()
    trainable, total = parameter_counts(model)
    if dims.pp > 1:  # each stage holds its own share
        import torch

        counts = dist.sum_over_stages(torch.tensor([trainable, total], device=dist.device))
        trainable, total = (int(x) for x in counts.tolist())
    layout = f"{dist.world_size} processes ({dims.describe()}) on " if dist.world_size > 1 else ""
    rec.header = {
        "model": job.model,
        "model_class": model_class,
        "device": layout + rt.label,
        "finetuning_type": job.training.finetuning_type,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "parallel": dims.as_dict(),
        "data": {
            "train": prepared.train.stats.as_dict(),
            "validation": prepared.validation.stats.as_dict() if prepared.validation else None,
        },
    }
    say = rec.say
    say(
        f"automodel: {job.model} ({model_class}, {total:,} parameters, "
        f"{trainable:,} trained = {100 * trainable / max(total, 1):.2f}%) on {layout}{rt.label}"
    )
    say(
        f"data: {len(train_rows):,} training rows"
        + (f", {len(val_rows):,} validation rows" if val_rows is not None else "")
        + f"; {plan.total_steps} steps ({plan.steps_per_epoch}/epoch), global batch "
        f"{plan.global_batch} = micro {plan.micro_batch} × accumulation {dims.grad_accum_steps}"
        + (f" × data parallel {dims.dp}" if dims.dp > 1 else "")
        + (f"; {plan.unreached_cap()}" if plan.unreached_cap() else "")
    )
    say(f"run directory: {run_dir}")
    stop.defer()  # the loop stops between steps, every rank at the same one
    loop.run()
    what = None
    if loop.step == plan.total_steps:
        final_dtype = base_dtype if base_dtype not in (None, rt.dtype) else None
        try:
            stop.expedite()  # final/ is written atomically: a stop abandons it at once
            what = export_run(
                run_dir / FINAL_DIR,
                job=job,
                model=model,
                tokenizer=tokenizer,
                dist=dist,
                load_dtype=rt.dtype,
                dtype=final_dtype,
            )
        except Stop as exc:
            raise loop.stopped(exc.signum, during="writing final/") from None
        stop.defer()  # the run is complete: a signal from here on changes nothing
    dist.barrier()
    summary = rec.completed(final=what)
    loop.close()
    return summary


def build_optimizer(model, *, lr: float, weight_decay: float, fused: bool):
    """AdamW; no weight decay on biases and norm weights (1-D parameters)."""
    import torch

    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, fused=fused or None)


class _Loop:
    def __init__(
        self,
        *,
        job,
        run_dir,
        rec: RunRecorder,
        rt,
        dist,
        model,
        optimizer,
        plan,
        train_rows,
        val_rows,
        pad_id,
        teacher=None,
        pipe=None,
        stop: StopSignals | None = None,
        layout=None,
    ):
        self.job, self.run_dir, self.rec, self.rt, self.dist = job, run_dir, rec, rt, dist
        self.stop = stop
        self.teacher, self.pipe = teacher, pipe
        self.layout = layout
        self.loss_sum = loss_function(dist, pad_id=pad_id)
        self.model, self.optimizer, self.plan = model, optimizer, plan
        self.train_rows, self.val_rows, self.pad_id = train_rows, val_rows, pad_id
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.step = 0

    # -- resume ----------------------------------------------------------------------------
    def restore(self) -> None:
        found = resume_checkpoint(self.run_dir, warn=note if self.dist.is_main else _silent)
        if found is None:
            return
        step, path = found
        state = load_checkpoint(
            path, model=self.model, optimizer=self.optimizer, partial=self.pipe is not None
        )
        if state["data"]["rows"] != self.plan.rows:
            raise UsageError(
                Problem(
                    "--resume",
                    f"the training data has {self.plan.rows} rows, the checkpoint was made with "
                    f"{state['data']['rows']}; start a new run",
                )
            )
        self.step = step
        self.rec.restore(state, step=step, checkpoint=str(path))

    # -- the loop --------------------------------------------------------------------------
    def run(self) -> None:
        plan = self.plan
        self.rec.begin(total_steps=plan.total_steps, steps_per_epoch=plan.steps_per_epoch)
        if self.rec.resumed_from is None and self.val_rows is not None:
            self._validate()  # the starting point, so the curve shows what training changed
        try:
            while self.step < plan.total_steps:
                epoch, within = plan.position(self.step)
                micro_plan = plan.epoch_steps(epoch, dp_rank=self.dist.dp_rank)
                step_rows = plan.step_rows(epoch)
                for i in range(within, len(micro_plan)):
                    if self.step >= plan.total_steps:
                        break
                    self._stop_if_asked()
                    rows = step_rows[i]  # the whole step's rows, every rank's
                    n_targets = int(self.train_rows.target_counts[rows].sum())
                    tokens = int(self.train_rows.lengths[rows].sum())
                    self._train_step(micro_plan[i], n_targets, tokens)
            self._stop_if_asked()  # a signal during the last step
        except KeyboardInterrupt:  # raised in the step, not by a signal handler of ours
            raise self.stopped(None) from None

    def _stop_if_asked(self) -> None:
        """Between steps: stop if any rank was told to (every rank takes the same answer, so
        none waits in a collective), with a checkpoint at the last completed step."""
        if self.stop is None:
            return
        signum = self.dist.max_over_ranks(self.stop.signum)
        if not signum:
            return
        if self.step and self.rec.last_checkpoint != str(checkpoint_path(self.run_dir, self.step)):
            self._checkpoint()
        raise self.stopped(signum)

    def stopped(self, signum: int | None, *, during: str | None = None) -> Interrupted:
        """Record the stop (rank 0); the error that says how to resume."""
        return self.rec.stopped(signum, during=during)

    def _train_step(self, micro_batches: list[list[int]], n_targets: int, tokens: int) -> None:
        import torch

        t0 = time.perf_counter()
        lr = learning_rate(
            self.step,
            peak=self.job.optimizer.learning_rate,
            warmup_steps=self.job.optimizer.warmup_steps,
            total_steps=self.plan.total_steps,
        )
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        # FSDP averages gradients over data(-and-context)-parallel ranks; each rank's loss is
        # already a share of the step's token mean, so scale it back to a sum
        scale = self.dist.data_size
        parts = torch.zeros(2, dtype=torch.float32, device=self.rt.device)  # CE, KD (distillation)
        if self.pipe is not None:
            total = self._pipeline_step(micro_batches, n_targets, scale)
        else:
            total = self._micro_steps(micro_batches, n_targets, scale, parts)
        self.layout.finish_grads()
        grad_norm = clip_grad_norm(
            self.params,
            GRAD_CLIP,
            device=self.rt.device,
            sum_over_stages=self.dist.sum_over_stages,
        )
        # non-last pipeline stages hold 0: the sum over stages is the last stage's loss
        reduced = self.dist.sum_over_stages(
            self.dist.sum_over_data(torch.cat([total.reshape(1), parts]))
        )
        loss_value, ce_part, kd_part, norm_value = torch.cat(
            [reduced, grad_norm.float().reshape(1)]
        ).tolist()
        step = self.step + 1
        if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
            self.optimizer.zero_grad(set_to_none=True)
            what = "loss" if not math.isfinite(loss_value) else "gradient norm"
            value = loss_value if what == "loss" else norm_value
            raise self.rec.diverged(step=step, what=what, value=value)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step = step
        extra = {"ce_loss": ce_part, "kd_loss": kd_part} if self.teacher is not None else {}
        self.rec.train_step(
            step=step,
            loss=loss_value,
            lr=lr,
            grad_norm=norm_value,
            tokens=tokens,
            seconds=time.perf_counter() - t0,
            **extra,
        )
        if self.val_rows is not None and self.plan.validate_after(step):
            self._validate()
        if self.plan.checkpoint_after(step):
            self._checkpoint()

    def _micro_steps(self, micro_batches, n_targets: int, scale: int, parts):
        """Forward and backward of each micro-batch; returns this rank's share of the loss."""
        import torch

        total = torch.zeros((), dtype=torch.float32, device=self.rt.device)
        sharded = hasattr(self.model, "set_requires_gradient_sync")  # an FSDP2 module
        for i, rows in enumerate(micro_batches):
            if sharded:  # reduce-scatter gradients once per step, after the last micro-batch
                self.model.set_requires_gradient_sync(i == len(micro_batches) - 1)
            # a rank with no rows left in a short last step still runs the collectives
            rows_data = self.train_rows.rows(rows) if rows else [EMPTY_ROW]
            batch = _to(collate(rows_data, pad_id=self.pad_id), self.rt)
            if self.teacher is None:
                loss = self.loss_sum(self.model, batch, autocast=self.rt.autocast)
                loss = loss / max(n_targets, 1)
            else:
                ce, kd = distill_loss_sums(
                    self.model,
                    self.teacher,
                    batch,
                    temperature=self.job.training.distillation_temperature,
                    autocast=self.rt.autocast,
                )
                ratio = self.job.training.distillation_ratio
                loss = ((1 - ratio) * ce + ratio * kd) / max(n_targets, 1)
                parts += torch.stack([ce, kd]).detach() / max(n_targets, 1)
            (loss * scale if scale > 1 else loss).backward()
            total += loss.detach()
        return total

    def _pipeline_step(self, micro_batches, n_targets: int, scale: int):
        """The step's micro-batches through the pipeline schedule; this rank's share of the
        loss on the last stage, 0 on the others."""
        batch = self.pipe.batch(
            [self.train_rows.rows(rows) for rows in micro_batches], device=self.rt.device
        )
        step_loss = self.pipe.train_step(batch, scale=scale / max(n_targets, 1))
        return step_loss / scale

    def _validate(self) -> None:
        pipe = self.pipe
        loss = evaluate(
            self.model if pipe is None else pipe.module,
            self.val_rows,
            micro=self.plan.micro_batch if pipe is None else pipe.rows,
            pad_id=self.pad_id,
            device=self.rt.device,
            autocast=self.rt.autocast,
            shard=(self.dist.dp_rank, self.dist.dp_size),
            reduce=lambda t: self.dist.sum_over_stages(self.dist.sum_over_data(t)),
            loss=self.loss_sum if pipe is None else pipe.loss_sum,
        )
        self.rec.validated(step=self.step, loss=loss, tokens=int(self.val_rows.lengths.sum()))

    def _checkpoint(self) -> None:
        state = {
            "epoch": self.plan.position(self.step)[0],
            "step_in_epoch": self.plan.position(self.step)[1],
            **self.rec.state(),
            "data": {"rows": self.plan.rows},
            "schedule": {
                "kind": "linear warmup, cosine decay to 10%",
                "peak_lr": self.job.optimizer.learning_rate,
                "warmup_steps": self.job.optimizer.warmup_steps,
                "total_steps": self.plan.total_steps,
            },
        }
        path = save_checkpoint(
            self.run_dir,
            self.step,
            model=self.model,
            optimizer=self.optimizer,
            state=state,
            write=self.dist.is_main,
            merge=stage_merger(self.dist),
        )
        self.rec.checkpoint_saved(path, step=self.step)
        if self.dist.is_main:
            prune_checkpoints(self.run_dir, self.job.output.keep_checkpoints)
        self.dist.barrier()

    def close(self) -> None:
        self.rec.close()


def _to(batch: dict[str, Any], rt: Runtime) -> dict[str, Any]:
    non_blocking = rt.device.type == "cuda"
    return {k: v.to(rt.device, non_blocking=non_blocking) for k, v in batch.items()}


def _seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _silent(_: str) -> None:
    """Ranks other than 0 say nothing."""
