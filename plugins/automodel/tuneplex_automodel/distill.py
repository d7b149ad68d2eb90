"""Logit-pair knowledge distillation: the student matches the teacher's softened distribution.

loss = (1 - ratio) · CE(student, targets) + ratio · T² · KL(p_teacher,T ‖ p_student,T),
both summed over the tokens the cross-entropy counts (the loss mask) and divided by the step's
token count. Only the counted positions are projected through the output heads, a chunk of
CHUNK tokens at a time and under activation checkpointing, so no more than one chunk of
full-vocabulary logits (per model) exists at once, forward or backward.
"""

from __future__ import annotations

import contextlib
from typing import Any

from tuneplex.data.targets import IGNORE_INDEX
from tuneplex.errors import Problem, UsageError

CHUNK = 1024
PRECISIONS = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


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
                "training.teacher_model",
                f"{teacher_ref}: the teacher's vocabulary differs from the student's "
                f"({'; '.join(parts)}); distillation needs the same tokenizer",
            )
        )
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
        a, b = getattr(student_tok, attr, None), getattr(teacher_tok, attr, None)
        if a != b:
            problems.append(
                Problem("training.teacher_model", f"{teacher_ref}: {attr} is {b}, student's {a}")
            )
    if problems:
        raise UsageError(problems)


def check_same_vocab_size(student, teacher, *, teacher_ref: str) -> None:
    s = student.get_output_embeddings().weight.shape[0]
    t = teacher.get_output_embeddings().weight.shape[0]
    if s != t:
        raise UsageError(
            Problem(
                "training.teacher_model",
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


def load_teacher(job, *, student, tokenizer, device):
    """The frozen teacher of a distillation job (None otherwise), checked against the student."""
    if job.training.training_type != "distillation":
        return None
    import torch
    from tuneplex.data.pipeline import load_tokenizer

    from tuneplex_automodel.model import load_model

    ref = job.training.teacher_model
    key = "training.teacher_model"
    check_same_tokenizer(
        tokenizer,
        load_tokenizer(ref, trust_remote_code=job.training.trust_remote_code, key=key),
        teacher_ref=ref,
    )
    model, _ = load_model(
        ref,
        dtype=getattr(torch, PRECISIONS[job.training.teacher_precision]),
        device="cpu",
        trust_remote_code=job.training.trust_remote_code,
        key=key,
    )
    check_same_vocab_size(student, model, teacher_ref=ref)
    return Teacher(model, device=device, offload=job.training.offload_teacher)
