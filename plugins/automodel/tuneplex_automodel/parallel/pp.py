"""Pipeline parallelism: the decoder layers split into stages, run by torch's pipelining schedules.

Each pipeline rank keeps only its stage of the model: the embeddings on the first stage, the
final norm and output head on the last, and an even share of the decoder layers (earlier
stages take the remainder). Layers stay under their one-process names (a ModuleDict keyed by
layer index), so checkpoints and final/ use the names of the whole model; the stages' state
dicts are merged on rank 0 when saved.

One optimizer step is one schedule step: the step's micro-batches are the pipeline's
micro-batches (1F1B when there are at least as many as stages, GPipe otherwise), all padded to
one (micro_batch_size, length) shape, since the stages exchange fixed-shape activations. The
loss of a micro-batch is its summed cross-entropy times the step's scale (1 / the step's
counted tokens, × the FSDP width), so the schedule's summed gradients are the step's mean.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from tuneplex.data.collate import EMPTY_ROW, collate, pad_rows
from tuneplex.data.targets import next_token_targets, summed_cross_entropy
from tuneplex.errors import Problem, UsageError
from tuneplex.nn.evaluation import autocast_context
from tuneplex.nn.logits import finish_logits
from tuneplex.nn.models import unwrap_peft

from tuneplex_automodel.parallel.cp import block_causal_mask
from tuneplex_automodel.parallel.cp import enable as enable_exact_attention
from tuneplex_automodel.parallel.mesh import Dist
from tuneplex_automodel.parallel.plans import StageParts

KEY = "parallelism.pipeline_parallel_size"


def stage_layers(n_layers: int, stages: int) -> list[range]:
    """Contiguous layer ranges, one per stage, sizes differing by at most one."""
    base, extra = divmod(n_layers, stages)
    out, lo = [], 0
    for s in range(stages):
        hi = lo + base + (1 if s < extra else 0)
        out.append(range(lo, hi))
        lo = hi
    return out


def check_splittable(base, *, stages: int) -> None:
    config = base.config
    problems = []
    n = config.num_hidden_layers
    if n < stages:
        problems.append(Problem(KEY, f"{stages} stages for a model of {n} decoder layers"))
    emb, head = base.get_input_embeddings(), base.get_output_embeddings()
    if head is not None and head.weight is emb.weight:
        problems.append(
            Problem(
                KEY,
                f"{stages}: {type(base).__name__} ties its output head to its input embeddings, "
                "which would live on different stages; set it to 1",
            )
        )
    if problems:
        raise UsageError(problems)


def keep_stage(model, *, dist: Dist, parts: StageParts):
    """Prune `model` in place to this rank's stage; returns the stage module to train.
    `parts` says where the family keeps its embeddings, layers, norm and head."""
    base = unwrap_peft(model)
    stages, s = dist.dims.pp, dist.pp_rank
    check_splittable(base, stages=stages)
    # stages pass a 4-D mask of their own: the attention function that adds each layer's
    # sliding window to such a mask (transformers' SDPA path would drop the window)
    enable_exact_attention(model, group=None)
    layers = base.get_submodule(parts.layers)
    mine = stage_layers(len(layers), stages)[s]
    _put(base, parts.layers, nn.ModuleDict({str(i): layers[i] for i in mine}))
    first, last = s == 0, s == stages - 1
    if not first:
        _put(base, parts.embed, None)
    if not last:
        _put(base, parts.norm, None)
        _put(base, parts.head, None)
    return Stage(model, parts=parts, first=first, last=last)


def _put(base, path: str, value) -> None:
    owner, _, name = path.rpartition(".")
    setattr(base.get_submodule(owner) if owner else base, name, value)


class Stage(nn.Module):
    """What the schedule runs on this rank: token ids or hidden states in, hidden states or
    logits out. Each stage builds the attention mask from the position ids it is given."""

    def __init__(self, model, *, parts: StageParts, first: bool, last: bool):
        super().__init__()
        self.model = model
        self.parts = parts
        self.first, self.last = first, last
        self.autocast = None

    def forward(self, x, position_ids):
        base = unwrap_peft(self.model)
        parts, config = self.parts, base.config
        with autocast_context(x.device, self.autocast):
            if self.first:
                h = base.get_submodule(parts.embed)(x)
                if parts.embed_multiplier:
                    h = h * getattr(config, parts.embed_multiplier)
            else:
                h = x
            mask = block_causal_mask(position_ids)
            pe = base.get_submodule(parts.rotary)(h, position_ids=position_ids)
            for layer in base.get_submodule(parts.layers).values():
                h = layer(h, attention_mask=mask, position_ids=position_ids, position_embeddings=pe)
            if self.last:
                h = base.get_submodule(parts.head)(base.get_submodule(parts.norm)(h))
                h = finish_logits(config, h)
        return h


class Pipeline:
    """The schedule of this rank's stage, and fixed-shape batches for it."""

    def __init__(
        self, stage, *, dist: Dist, n_microbatches: int, micro: int, length: int, pad_id: int
    ):
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        self.dist, self.module = dist, stage
        self.n_microbatches, self.micro, self.length = n_microbatches, micro, length
        self.rows_per_step, self.pad_id = n_microbatches * micro, pad_id
        self.stage = PipelineStage(
            stage, dist.pp_rank, dist.dims.pp, dist.device, group=dist.group("pp")
        )
        kind = Schedule1F1B if n_microbatches >= dist.dims.pp else ScheduleGPipe
        self.schedule = kind(self.stage, n_microbatches, loss_fn=self._loss, scale_grads=False)
        self.schedule_name = "1F1B" if kind is Schedule1F1B else "GPipe"
        self.scale = 1.0

    @property
    def first(self) -> bool:
        return self.module.first

    @property
    def last(self) -> bool:
        return self.module.last

    def _loss(self, logits, targets):
        return summed_cross_entropy(logits=logits, targets=targets) * self.scale

    def batch(self, micro_batches: list[list[dict[str, Any]]], *, device):
        """The step's micro-batches as one (n_microbatches × micro, length) batch; missing
        rows and micro-batches are rows that count for nothing."""
        rows: list[dict[str, Any]] = []
        for i in range(self.n_microbatches):
            mb = micro_batches[i] if i < len(micro_batches) else []
            rows += list(mb) + [EMPTY_ROW] * (self.micro - len(mb))
        return self._fill(collate(rows, pad_id=self.pad_id), device=device)

    def _fill(self, batch, *, device=None):
        """A collated batch grown to the schedule's (rows, length) shape by `pad_rows` (on the
        host), on `device` (default: the batch's): the added columns and rows are padding
        samples that count for nothing."""
        device = batch["input_ids"].device if device is None else device
        n = batch["input_ids"].shape[0]
        host = {k: batch[k].cpu() for k in ("input_ids", "labels", "position_ids")}
        rows = [{k: v[i] for k, v in host.items()} for i in range(n)]
        rows += [{"input_ids": (), "labels": ()}] * (self.rows_per_step - n)
        out = pad_rows(rows, length=self.length, pad_id=self.pad_id, device=device)
        targets = next_token_targets(labels=out.pop("labels"), position_ids=out["position_ids"])
        return {**out, "targets": targets}

    def _run(self, batch, *, train: bool):
        losses: list = []
        args = (batch["input_ids"],) if self.first else ()
        target = batch["targets"] if self.last else None
        kw = {"position_ids": batch["position_ids"]}
        if train:
            self.schedule.step(*args, target=target, losses=losses, return_outputs=False, **kw)
        else:
            with torch.no_grad():
                self.schedule.eval(*args, target=target, losses=losses, **kw)
        if not self.last:
            return torch.zeros((), dtype=torch.float32, device=self.dist.device)
        return torch.stack([torch.as_tensor(x).detach().float() for x in losses]).sum()

    def train_step(self, batch, *, scale: float):
        """Forward and backward of one step; the last stage returns its loss (others 0)."""
        self.scale = scale
        return self._run(batch, train=True)

    def loss_sum(self, model, batch, *, autocast=None):
        """Summed cross-entropy of a collated batch of at most `rows` rows, forward only (last
        stage; others 0): the `loss` of core's evaluate (the stage keeps its own autocast)."""
        self.scale = 1.0
        return self._run(self._fill(batch), train=False)


def merge_stages(state: Any, *, dist: Dist) -> list[Any] | None:
    """Every stage's `state` on global rank 0 (stage order); None elsewhere. Only the ranks of
    rank 0's pipeline group take part (their full state equals their peers')."""
    if dist.dims.pp == 1:
        return [state] if dist.is_main else None
    if dist.local_rank_in("dp_cp") or dist.local_rank_in("tp"):
        return None
    import torch.distributed as tdist

    out = [None] * dist.dims.pp if dist.is_main else None
    tdist.gather_object(state, out, dst=0, group=dist.group("pp"))
    return out
