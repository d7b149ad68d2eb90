"""Logit-pair knowledge distillation: the student matches the teacher's softened distribution.

loss = (1 - ratio) · CE(student, targets) + ratio · T² · KL(p_teacher,T ‖ p_student,T),
both summed over the tokens the cross-entropy counts (the loss mask) and divided by the step's
token count. Only the counted positions are projected through the output heads, a chunk of
CHUNK tokens at a time and under activation checkpointing, so no more than one chunk of
full-vocabulary logits (per model) exists at once, forward or backward. The student's head is
therefore called apart from its decoder: an FSDP unit of its own (`separate_head`).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

from tuneplex.data.targets import IGNORE_INDEX
from tuneplex.errors import Problem, UsageError

from tuneplex_automodel.loop import backward_micro_batches, device_batch
from tuneplex_automodel.objectives.sft import row_tables, token_mean_loss

if TYPE_CHECKING:
    from tuneplex.data.collate import RowTable
    from tuneplex.data.pipeline import Prepared

    from tuneplex_automodel.loop import Components
    from tuneplex_automodel.parallel.mesh import Dist
    from tuneplex_automodel.schema import AutomodelJobInput
    from tuneplex_automodel.trainer import Runtime

CHUNK = 1024
PRECISIONS = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
TEACHER_KEY = "training.teacher_model"


def check_same_tokenizer(student_tok, teacher_tok, *, teacher_ref: str) -> None:
    """Same vocabulary (token -> id, not only size) and the same special tokens, or refuse."""
    problems = []
    sv, tv = student_tok.get_vocab(), teacher_tok.get_vocab()
    if sv != tv:
        only_s = sorted(set(sv) - set(tv))
        only_t = sorted(set(tv) - set(sv))
        moved = sorted(k for k in set(sv) & set(tv) if sv[k] != tv[k])
        parts = [f"{len(sv)} vs {len(tv)} tokens"]
        if only_s:
            parts.append(f"only the student has {_few(only_s)}")
        if only_t:
            parts.append(f"only the teacher has {_few(only_t)}")
        if moved:
            parts.append(f"different ids for {_few(moved)}")
        problems.append(
            Problem(
                TEACHER_KEY,
                f"{teacher_ref}: the teacher's vocabulary differs from the student's "
                f"({'; '.join(parts)}); distillation needs the same tokenizer",
            )
        )
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
        a, b = getattr(student_tok, attr, None), getattr(teacher_tok, attr, None)
        if a != b:
            problems.append(Problem(TEACHER_KEY, f"{teacher_ref}: {attr} is {b}, student's {a}"))
    if problems:
        raise UsageError(problems)


def check_same_vocab_size(student, teacher, *, teacher_ref: str) -> None:
    s = student.get_output_embeddings().weight.shape[0]
    t = teacher.get_output_embeddings().weight.shape[0]
    if s != t:
        raise UsageError(
            Problem(
                TEACHER_KEY,
                f"{teacher_ref}: output head has {t} logits, the student's {s}",
            )
        )


def _few(items: list[str], n: int = 3) -> str:
    shown = ", ".join(repr(x) for x in items[:n])
    return shown + (f" and {len(items) - n} more" if len(items) > n else "")


class Teacher:
    """The frozen teacher: eval mode, no gradients, never in the optimizer; with `offload`,
    its weights stay in CPU memory and visit the GPU only for its forward passes."""

    def __init__(self, model, *, device, offload: bool):
        self.model = model.eval().requires_grad_(False)
        self.device, self.offload = device, offload and device.type == "cuda"
        self.model.to("cpu" if self.offload else device)

    @contextlib.contextmanager
    def on_device(self):
        if self.offload:
            self.model.to(self.device, non_blocking=True)
        try:
            yield self.model
        finally:
            if self.offload:
                self.model.to("cpu")


def distill_loss_sums(
    student, teacher: Teacher, batch: dict[str, Any], *, temperature: float, autocast=None
):
    """(CE sum, KD sum) over the batch's counted targets, as float32 tensors."""
    import torch
    import torch.utils.checkpoint

    targets = batch["targets"].reshape(-1)
    keep = (targets != IGNORE_INDEX).nonzero().squeeze(1)
    from tuneplex.nn.evaluation import autocast_context

    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    with autocast_context(batch["input_ids"].device, autocast), teacher.on_device() as t:
        hs = student.get_decoder()(**inputs, use_cache=False).last_hidden_state
        with torch.no_grad():
            ht = t.get_decoder()(**inputs, use_cache=False).last_hidden_state
        hs = hs.reshape(-1, hs.shape[-1]).index_select(0, keep)
        ht = ht.reshape(-1, ht.shape[-1]).index_select(0, keep)
        tg = targets.index_select(0, keep)
        ce = torch.zeros((), dtype=torch.float32, device=hs.device)
        kd = torch.zeros((), dtype=torch.float32, device=hs.device)
        head, t_head = student.get_output_embeddings(), t.get_output_embeddings()
        for start in range(0, tg.numel(), CHUNK):
            sl = slice(start, start + CHUNK)
            c, k = torch.utils.checkpoint.checkpoint(
                _chunk,
                head,
                t_head,
                hs[sl],
                ht[sl],
                tg[sl],
                temperature,
                (student.config, t.config),
                use_reentrant=False,
            )
            ce, kd = ce + c, kd + k
    return ce, kd


def _chunk(head, t_head, hs, ht, tg, temperature: float, configs):
    import torch
    import torch.nn.functional as F
    from tuneplex.nn.logits import finish_logits

    logits = finish_logits(configs[0], head(hs).float())
    with torch.no_grad():
        t_logits = finish_logits(configs[1], t_head(ht).float())
        t_logp = F.log_softmax(t_logits / temperature, dim=-1)
    s_logp = F.log_softmax(logits / temperature, dim=-1)
    ce = F.cross_entropy(logits, tg, reduction="sum")
    kd = (t_logp.exp() * (t_logp - s_logp)).sum() * temperature**2
    return ce, kd


class Distillation:
    """The objective of a distillation job: rows as for SFT, the teacher loaded with the
    student, a loss of two parts reported as `ce_loss` and `kd_loss`."""

    updates_per_step = 1
    unit = "rows"
    separate_head = True

    def __init__(self, job: AutomodelJobInput):
        t = job.training
        self.teacher_ref = t.teacher_model
        self.ratio, self.temperature = t.distillation_ratio, t.distillation_temperature
        self.precision, self.offload = t.teacher_precision, t.offload_teacher
        self.trust_remote_code = t.trust_remote_code
        self.models = ((TEACHER_KEY, self.teacher_ref),)
        self.teacher: Teacher | None = None

    def tables(self, prepared: Prepared) -> tuple[RowTable, RowTable | None]:
        return row_tables(prepared)

    def setup_model(self, model: Any, *, tokenizer: Any, runtime: Runtime, dist: Dist) -> None:
        """The frozen teacher, checked against the student; a head tied to the embeddings
        cannot be the FSDP unit of its own that data parallelism would make it."""
        self.teacher = load_teacher(
            self.teacher_ref,
            student=model,
            tokenizer=tokenizer,
            device=runtime.device,
            precision=self.precision,
            offload=self.offload,
            trust_remote_code=self.trust_remote_code,
        )
        if dist.dp_cp_size > 1:
            check_untied_head(model, dp=dist.dims.dp)

    def begin(self, parts: Components) -> None:
        """Nothing before the first step."""

    def gradients(
        self, parts: Components, *, micro_batches: list[list[int]], step_rows: list[int], **_: Any
    ) -> tuple[Any, Any]:
        """The step's loss, and its CE and KD parts as figures."""
        import torch

        n_targets = max(int(parts.train_rows.target_counts[step_rows].sum()), 1)

        def loss_of(indices: list[int]):
            ce, kd = distill_loss_sums(
                parts.model,
                self.teacher,
                device_batch(
                    parts.train_rows, indices, pad_id=parts.pad_id, device=parts.runtime.device
                ),
                temperature=self.temperature,
                autocast=parts.runtime.autocast,
            )
            loss = ((1 - self.ratio) * ce + self.ratio * kd) / n_targets
            return loss, torch.stack([ce, kd]).detach() / n_targets

        return backward_micro_batches(parts, micro_batches, loss_of=loss_of)

    def figures(self, sums: list[float]) -> dict[str, float]:
        ce, kd = sums
        return {"ce_loss": ce, "kd_loss": kd}

    def validate(self, parts: Components) -> tuple[float, dict[str, float]]:
        """The student's own cross-entropy, as SFT measures it."""
        return token_mean_loss(parts), {}

    def state(self) -> dict[str, Any]:
        return {}

    def restore(self, state: dict[str, Any]) -> None:
        """Nothing to take back: the teacher is loaded again from its reference."""


def load_teacher(
    ref: str,
    *,
    student,
    tokenizer,
    device,
    precision: str,
    offload: bool,
    trust_remote_code: bool,
) -> Teacher:
    """The frozen teacher at `ref`, checked against the student."""
    import torch
    from tuneplex.data.pipeline import load_tokenizer

    from tuneplex_automodel.model import load_model

    check_same_tokenizer(
        tokenizer,
        load_tokenizer(ref, trust_remote_code=trust_remote_code, key=TEACHER_KEY),
        teacher_ref=ref,
    )
    model, _ = load_model(
        ref,
        dtype=getattr(torch, PRECISIONS[precision]),
        device="cpu",
        trust_remote_code=trust_remote_code,
        key=TEACHER_KEY,
    )
    check_same_vocab_size(student, model, teacher_ref=ref)
    return Teacher(model, device=device, offload=offload)


def check_untied_head(model, *, dp: int) -> None:
    from tuneplex.nn.models import unwrap_peft

    base = unwrap_peft(model)
    if base.get_output_embeddings().weight is base.get_input_embeddings().weight:
        raise UsageError(
            Problem(
                "training.training_type",
                f"distillation across {dp} data-parallel ranks needs an output head not tied to "
                "the input embeddings (this model ties them); train it in one process",
            )
        )
