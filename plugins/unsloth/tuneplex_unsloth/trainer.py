"""The unsloth backend's training: the core data pipeline, TRL's SFTTrainer, DPOTrainer (dpo.py) or
GRPOTrainer (grpo.py), our run directory.

Order matters: CUDA_VISIBLE_DEVICES is set first, then unsloth is imported (through the
loader) before transformers, peft and trl, all in the process that trains.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Protocol

from tuneplex.console import note
from tuneplex.data.collate import RowTable, collate_for_hf
from tuneplex.data.pipeline import prepare
from tuneplex.errors import Problem, TrainingStopped, UsageError
from tuneplex.nn.evaluation import evaluate, pad_id_of
from tuneplex.nn.models import parameter_counts
from tuneplex.progress import quiet_third_party_logs
from tuneplex.runs import (
    CHECKPOINTS_DIR,
    FINAL_DIR,
    RunHeader,
    RunRecorder,
    checkpoint_path,
    resume_checkpoint,
    stopped_early,
)
from tuneplex.signals import Stop, StopSignals

from tuneplex_unsloth.model import Loader, UnslothLoader
from tuneplex_unsloth.schema import UnslothJobInput

BACKEND = "unsloth"
LOADER: type[Loader] = UnslothLoader
"""The loader class `train` uses; tests put `PeftLoader` here to run on CPU."""


def select_gpus(job: UnslothJobInput) -> None:
    """hardware.gpus -> CUDA_VISIBLE_DEVICES, which only counts before CUDA initialises."""
    gpus = job.hardware.gpus
    if gpus is None:
        return
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        if os.environ.get("CUDA_VISIBLE_DEVICES") != gpus:
            raise UsageError(
                Problem(
                    "hardware.gpus",
                    "CUDA was initialised in this process before training started, so the GPU "
                    "choice cannot apply; run `tuneplex train` in a fresh process",
                )
            )
        return
    os.environ["CUDA_VISIBLE_DEVICES"] = gpus


def training_args(job: UnslothJobInput, run_dir: Path, *, cuda: bool) -> dict[str, Any]:
    """The TrainingArguments every method shares, key by key from the job."""
    s, b, o = job.schedule, job.batch, job.optimizer
    return dict(
        output_dir=str(run_dir / CHECKPOINTS_DIR),
        num_train_epochs=s.epochs,
        max_steps=s.max_steps or -1,
        per_device_train_batch_size=b.per_device_train_batch_size,
        per_device_eval_batch_size=b.per_device_train_batch_size,
        gradient_accumulation_steps=b.gradient_accumulation_steps,
        gradient_checkpointing=bool(job.training.use_gradient_checkpointing),
        learning_rate=o.learning_rate,
        weight_decay=o.weight_decay,
        optim=o.optim,
        adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2,
        lr_scheduler_type=s.lr_scheduler_type,
        lr_scheduler_kwargs=scheduler_kwargs(job),
        warmup_steps=s.warmup_ratio if s.warmup_ratio is not None else s.warmup_steps,
        max_grad_norm=o.max_grad_norm,
        logging_strategy="steps",
        logging_steps=s.logging_steps,
        logging_nan_inf_filter=False,
        save_strategy="steps" if s.save_steps else "no",
        save_steps=s.save_steps or 1,
        eval_strategy="no",  # validation runs in RunDirCallback, the same way for every backend
        seed=s.seed,
        data_seed=s.seed,
        **precision_flags(job, cuda=cuda),
        report_to="none",  # the run recorder logs to the job's trackers
        remove_unused_columns=False,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )


MIN_LR_RATE = 0.1
"""cosine_with_min_lr's end when optimizer.min_learning_rate is not given, as a fraction of the
learning rate (the automodel backend's default too)."""


def scheduler_kwargs(job: UnslothJobInput) -> dict[str, float]:
    """Hugging Face's lr_scheduler_kwargs: the end of cosine_with_min_lr."""
    if job.schedule.lr_scheduler_type != "cosine_with_min_lr":
        return {}
    low = job.optimizer.min_learning_rate
    return {"min_lr_rate": MIN_LR_RATE} if low is None else {"min_lr": low}


def sft_config(job: UnslothJobInput, run_dir: Path, *, cuda: bool):
    """SFTConfig from the job (the data arrives tokenized, masked and packed)."""
    from trl import SFTConfig

    return SFTConfig(
        **training_args(job, run_dir, cuda=cuda),
        dataset_kwargs={"skip_prepare_dataset": True},
        max_length=job.model.max_seq_length,
        packing=False,
    )


def precision_flags(job: UnslothJobInput, *, cuda: bool) -> dict[str, bool]:
    """hardware.precision on a GPU; plain fp32 on CPU (the test seam's machine)."""
    if not cuda:
        return {"bf16": False, "fp16": False, "use_cpu": True}
    bf16 = job.hardware.precision == "bf16"
    return {"bf16": bf16, "fp16": not bf16, "use_cpu": False}


class TokenCounter:
    """Counts real (non-padding) tokens of every training batch the collator builds."""

    def __init__(self, collate: Callable[[list], dict], *, tokens: Callable[[list], int]):
        self.collate, self.tokens, self.total = collate, tokens, 0

    def __call__(self, rows):
        self.total += self.tokens(rows)
        return self.collate(rows)


def row_tokens(rows) -> int:
    return sum(len(r["input_ids"]) for r in rows)


Validate = Callable[[Any], tuple[float, int, dict[str, float]]]
"""model -> (validation loss, tokens, further figures for metrics.jsonl)."""


def sft_validation(job: UnslothJobInput, val_rows: RowTable, *, pad_id: int) -> Validate:
    """The core's validation loss of every row, the same as every backend's."""

    def validate(model):
        import torch

        device = next(model.parameters()).device
        autocast = None
        if device.type == "cuda":
            autocast = torch.bfloat16 if job.hardware.precision == "bf16" else torch.float16
        loss = evaluate(
            model,
            val_rows,
            micro=job.batch.per_device_train_batch_size,
            pad_id=pad_id,
            device=device,
            autocast=autocast,
        )
        return loss, int(val_rows.lengths.sum()), {}

    return validate


def _callback_base():
    from transformers import TrainerCallback

    return TrainerCallback


def make_callback(**kw):
    class RunDirCallback(_callback_base()):
        """HF's loop reported to the run recorder: steps, validation, NaN stop, checkpoints.
        `log_keys` names the figures of HF's log lines that go to metrics.jsonl (ours: theirs)."""

        def __init__(self, *, job, rec, validate, counter, stop=None, log_keys=None):
            self.job, self.rec, self.validate = job, rec, validate
            self.stop, self.counter = stop, counter
            self.log_keys: dict[str, str] = log_keys or {}
            self.last_tokens = 0
            self.failed_step: int | None = None
            self.failed_value: float | None = None
            self.val_pending = False

        def on_train_begin(self, args, state, control, model=None, **_):
            steps_per_epoch = state.max_steps / max(args.num_train_epochs, 1)
            if args.max_steps and args.max_steps > 0 and state.num_train_epochs:
                steps_per_epoch = state.max_steps / state.num_train_epochs
            self.rec.begin(total_steps=state.max_steps, steps_per_epoch=steps_per_epoch)
            if self.rec.resumed_from is None and self.validate is not None:
                self._validate(model, 0, 0.0)

        def on_step_end(self, args, state, control, model=None, **_):
            self.rec.step = state.global_step
            if self.stop is not None and self.stop.signum:  # asked to stop: after this step
                control.should_log = control.should_save = control.should_training_stop = True
            if self.validate is None:
                return
            every = self.job.schedule.eval_steps
            due = (every and state.global_step % every == 0) or state.global_step == state.max_steps
            if due and control.should_log:
                self.val_pending = True  # after this step's train line
            elif due:
                self._validate(model, state.global_step, state.epoch or 0.0)

        def on_log(self, args, state, control, logs=None, model=None, **_):
            logs = logs or {}
            if "loss" in logs:
                tokens, self.last_tokens = self.counter.total - self.last_tokens, self.counter.total
                loss = float(logs["loss"])
                self.rec.train_step(
                    step=state.global_step,
                    epoch=state.epoch or 0.0,
                    loss=loss,
                    lr=logs.get("learning_rate"),
                    grad_norm=_float(logs.get("grad_norm")),
                    tokens=tokens,
                    **{ours: float(logs[k]) for ours, k in self.log_keys.items() if k in logs},
                )
                if not math.isfinite(loss):
                    self.failed_step, self.failed_value = state.global_step, loss
                    control.should_training_stop = True
                    control.should_save = False
                    self.val_pending = False
                    return
            if self.val_pending:
                self.val_pending = False
                self._validate(model, state.global_step, state.epoch or 0.0)

        def on_save(self, args, state, control, **_):
            written = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if written.is_dir():
                keep = self.job.output.keep_checkpoints
                self.rec.adopt_checkpoint(written, step=state.global_step, keep=keep)

        def _validate(self, model, step, epoch):
            loss, tokens, figures = self.validate(model)
            self.rec.validated(step=step, loss=loss, tokens=tokens, epoch=epoch, **figures)

    return RunDirCallback(**kw)


def trainer_class():
    """TRL's SFTTrainer; off CUDA its Triton-only fused LM-head loss is replaced by the model's
    own loss (same labels, same normalisation by the step's token count)."""
    from transformers import Trainer
    from trl import SFTTrainer

    class CpuSafeSFTTrainer(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if inputs["input_ids"].device.type == "cuda":
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)

    return CpuSafeSFTTrainer


class Tally(Protocol):
    total: int
    """Tokens trained so far."""


@dataclass(frozen=True)
class Method:
    """What a training method gives the shared loop: TRL's trainer, the token counter of its
    collator (or of its batches), its validation, and the figures of its log lines that go to
    metrics.jsonl."""

    trainer: Any
    counter: Tally
    validate: Validate | None
    log_keys: dict[str, str]


def sft_method(job, run_dir, *, model, tokenizer, prepared, pad_id: int, cuda: bool) -> Method:
    counter = TokenCounter(partial(collate_for_hf, pad_id=pad_id), tokens=row_tokens)
    trainer = trainer_class()(
        model=model,
        args=sft_config(job, run_dir, cuda=cuda),
        train_dataset=prepared.train.dataset,
        processing_class=tokenizer,
        data_collator=counter,
    )
    validate = None
    if prepared.validation is not None:
        validate = sft_validation(job, RowTable(prepared.validation.dataset), pad_id=pad_id)
    return Method(trainer, counter, validate, {})


def dpo_method(job, run_dir, *, model, tokenizer, prepared, pad_id: int, cuda: bool) -> Method:
    from tuneplex_unsloth.dpo import (
        collator_for,
        dpo_config,
        log_keys,
        pair_dataset,
        preference_trainer_class,
    )

    collate = collator_for(job, pad_id)
    counter = TokenCounter(collate, tokens=collate.tokens)
    trainer = preference_trainer_class(job)(
        model=model,
        args=dpo_config(job, common=training_args(job, run_dir, cuda=cuda)),
        train_dataset=pair_dataset(prepared.train.dataset),
        processing_class=tokenizer,
        data_collator=counter,
    )
    validate = None
    if prepared.validation is not None:
        pairs = pair_dataset(prepared.validation.dataset)
        micro = job.batch.per_device_train_batch_size

        def validate(_model):  # TRL's loss, with its reference, on the trainer's model
            return trainer.validate_pairs(pairs, collate=collate, micro=micro)

    return Method(trainer, counter, validate, log_keys(job))


def grpo_method(
    job, run_dir, *, model, tokenizer, prepared, pad_id: int, cuda: bool, reward, rec
) -> Method:
    """TRL's GRPOTrainer on the prompt split, scored by the job's reward (built before the
    model loaded); generated samples go to rollouts.jsonl through `rec`."""
    from tuneplex_unsloth.grpo import (
        Scorer,
        TokenTally,
        advantage_rule,
        figure_keys,
        grpo_config,
        grpo_trainer_class,
    )

    g = job.training.grpo
    scorer = Scorer(
        reward, group=g.num_generations_per_prompt, every=g.rollout_log_steps, record=rec.rollouts
    )
    tally = TokenTally()
    trainer = grpo_trainer_class()(
        model=model,
        args=grpo_config(
            job, common=training_args(job, run_dir, cuda=cuda), weights=scorer.weights
        ),
        train_dataset=prepared.train.dataset,
        processing_class=tokenizer,
        scorer=scorer,
        advantages=advantage_rule(g),
        generation_batch=g.generation_batch_size,
        tally=tally,
    )
    return Method(trainer, tally, None, figure_keys(scorer.names))


def train(job: UnslothJobInput, run_dir: Path, *, resume: bool, data_spec) -> dict[str, Any]:
    with StopSignals(say=note) as stop:
        try:
            return _train(job, run_dir, resume=resume, data_spec=data_spec, stop=stop)
        except Stop as exc:  # while loading: nothing worth saving yet
            raise stopped_early(run_dir, backend=BACKEND, signum=exc.signum) from None


def _train(
    job: UnslothJobInput, run_dir: Path, *, resume: bool, data_spec, stop: StopSignals
) -> dict[str, Any]:
    quiet_third_party_logs()
    select_gpus(job)
    loader = LOADER()  # imports unsloth first on the real path
    reward = None
    if job.training.grpo is not None:  # the user's reward file runs once, before the model loads
        from tuneplex.inference.rewards import build_reward

        reward = build_reward(
            job.training.grpo.environment, base_dir=Path.cwd(), key="training.grpo.environment"
        )
    import torch

    cuda = torch.cuda.is_available()
    if cuda and job.hardware.precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise UsageError(
            Problem(
                "hardware.precision",
                f"bf16 is not supported by {torch.cuda.get_device_name()}; set "
                "hardware.precision: fp16",
            )
        )
    model, tokenizer = loader.load(job)
    if job.training.lora is not None:
        model = loader.add_lora(model, job)
    prepared = prepare(data_spec, report=note)
    pad_id = pad_id_of(prepared.tokenizer)

    for debris in (run_dir / CHECKPOINTS_DIR).glob("checkpoint-*"):
        shutil.rmtree(debris, ignore_errors=True)  # a save that never finished
    found = resume_checkpoint(run_dir, warn=note) if resume else None
    trainable, total = parameter_counts(model)
    device = "cuda (" + torch.cuda.get_device_name() + ")" if cuda else "cpu"
    header = RunHeader(
        model=job.model.name,
        loader=loader.name,
        device=device,
        training_type=job.training.training_type,
        finetuning_type=job.training.finetuning_type,
        trainable_parameters=trainable,
        total_parameters=total,
        data={
            "train": prepared.train.stats.as_dict(),
            "validation": prepared.validation.stats.as_dict() if prepared.validation else None,
        },
    )
    rec = RunRecorder(
        run_dir,
        backend=BACKEND,
        job=job,
        device_type="cuda" if cuda else "cpu",
        header=header,
    )
    if found:
        rec.restore({}, step=found[0], checkpoint=str(found[1]))
    kind = job.training.training_type
    items = len(prepared.train.dataset) // (2 if kind == "dpo" else 1)
    unit = {"dpo": "pairs", "grpo": "prompts"}.get(kind, "rows")
    rec.say(
        f"unsloth: {job.model.name} via {loader.name} ({total:,} parameters, {trainable:,} "
        f"trained) on {device}; {items:,} training {unit}"
    )
    build = {
        "sft": sft_method,
        "dpo": dpo_method,
        "grpo": partial(grpo_method, reward=reward, rec=rec),
    }[kind]
    method = build(
        job, run_dir, model=model, tokenizer=tokenizer, prepared=prepared, pad_id=pad_id, cuda=cuda
    )
    trainer = method.trainer
    callback = make_callback(
        job=job,
        rec=rec,
        validate=method.validate,
        counter=method.counter,
        stop=stop,
        log_keys=method.log_keys,
    )
    trainer.add_callback(callback)
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # RunDirCallback prints what the run shows
    stop.defer()  # HF's loop stops after the step in progress: RunDirCallback.on_step_end
    try:
        trainer.train(resume_from_checkpoint=str(found[1]) if found else None)
    except KeyboardInterrupt:  # raised in a step, not by a signal handler of ours
        raise rec.stopped(None) from None
    except TrainingStopped as exc:  # a reward that raised: its file:line
        save_last_step(trainer, rec, job)
        rec.failed(exc)
        raise
    finally:
        rec.close()
    if stop.signum:
        raise rec.stopped(stop.signum)
    if callback.failed_step is not None:
        raise rec.diverged(step=callback.failed_step, what="loss", value=callback.failed_value)
    from tuneplex_unsloth.export import export_final

    try:
        stop.expedite()  # final/ is written atomically: a stop abandons it at once
        what = export_final(
            run_dir / FINAL_DIR, model=trainer.model, tokenizer=tokenizer, job=job, loader=loader
        )
    except Stop as exc:
        raise rec.stopped(exc.signum, during="writing final/") from None
    stop.defer()  # the run is complete: a signal from here on changes nothing
    return rec.completed(final=what)


def save_last_step(trainer, rec: RunRecorder, job: UnslothJobInput) -> None:
    """The last completed step as a checkpoint, if it is not one already, so that a run that
    failed in its own code (a reward) resumes once the cause is fixed. A reward runs as a step
    begins (TRL generates then), before any of its gradients: nothing of it is kept."""
    step = trainer.state.global_step
    if not step or rec.last_checkpoint == str(checkpoint_path(rec.run_dir, step)):
        return
    trainer._save_checkpoint(trainer.model, trial=None)
    written = Path(trainer.args.output_dir) / f"checkpoint-{step}"
    rec.adopt_checkpoint(written, step=step, keep=job.output.keep_checkpoints)


def _float(x):
    return float(x) if x is not None else None
