"""The job's parallelism applied to a model: checks first, then context, expert and tensor
parallelism, then FSDP2 (torchtitan's order), each by its own applier with explicit arguments.

What differs between model families is data (`plans.FAMILIES`); an architecture without a plan
trains with data, context and expert parallelism, and only tensor or pipeline parallelism
refuses it. LoRA adapters follow their base layer (`plans.lora_plan`). Expert weights are
sharded over the expert ranks and left out of FSDP; `Parallelized.finish_grads` completes
their gradients and those of weights replicated across tensor-parallel ranks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any

from tuneplex.errors import Problem, UsageError
from tuneplex.nn.models import adapter_names, unwrap_peft

from tuneplex_automodel.parallel import plans
from tuneplex_automodel.parallel.mesh import Dist


def decoder_layers(model) -> list[Any]:
    """The decoder layers of a transformers model (or a peft model wrapping one), in order:
    the modules of the classes it declares unsplittable (`_no_split_modules`)."""
    base = unwrap_peft(model)
    kinds = set(getattr(base, "_no_split_modules", None) or ())
    return [m for m in base.modules() if type(m).__name__ in kinds]


def check_plan(cls: str, *, dist_dims) -> plans.Family | None:
    """The family of `cls`; a one-line refusal when the layout needs a plan it lacks."""
    family = plans.family_of(cls)
    if dist_dims.tp > 1 and family is None:
        raise UsageError(
            Problem(
                "parallelism.tensor_parallel_size",
                f"{dist_dims.tp}: {cls} has no tensor-parallel plan; supported: "
                f"{', '.join(plans.supported())} (data, context and expert parallelism "
                "need none)",
            )
        )
    if dist_dims.pp > 1 and (family is None or family.stages is None):
        raise UsageError(
            Problem(
                "parallelism.pipeline_parallel_size",
                f"{dist_dims.pp}: {cls} has no pipeline description; supported: "
                f"{', '.join(plans.supported(pipeline=True))}",
            )
        )
    return family


@dataclass
class Parallelized:
    """What the loop needs from the layout after each backward."""

    dist: Dist
    experts: list[Any] = field(default_factory=list)
    tp_partial: list[Any] = field(default_factory=list)

    def finish_grads(self) -> None:
        """Gradients as one process would have them (before clipping)."""
        if self.tp_partial:
            from tuneplex_automodel.parallel.tp import finish_grads

            finish_grads(self.tp_partial, group=self.dist.group("tp"))
        if self.experts:
            from tuneplex_automodel.parallel.ep import reduce_expert_grads

            reduce_expert_grads(self.experts, dist=self.dist)


def parallelize(
    model,
    *,
    dist: Dist,
    family: plans.Family | None,
    separate_head: bool = False,
    root=None,
) -> Parallelized:
    """Apply the job's parallelism in place (nothing on one process). `family`: what
    `check_plan` found for the model's class (it has refused a layout the family lacks).

    `separate_head`: the decoder and the output head become FSDP units of their own, so they
    can be called one after the other (an objective that projects hidden states through the
    head in chunks; it refuses a head tied to the embeddings). `root`: the module whose forward
    runs (a pipeline stage), sharded last instead of the model.
    """
    out = Parallelized(dist=dist)
    if dist.world_size == 1:
        return out
    dims = dist.dims
    base = unwrap_peft(model)
    layers = decoder_layers(model)
    if dims.cp > 1:
        from tuneplex_automodel.parallel.cp import enable

        enable(model, group=dist.group("cp"))
    if dims.ep > 1:
        from tuneplex_automodel.parallel.ep import expert_parallel, expert_parameters

        expert_parallel(model, mesh=dist.mesh("ep"))
        out.experts = expert_parameters(model)
    if dims.tp > 1:
        from tuneplex_automodel.parallel.tp import apply_tp, check_divisible

        check_divisible(base.config, dims.tp, sizes=family.divides)
        plan = plans.lora_plan(family.tp, adapter_names(model))
        apply_tp(layers, plan=plan, mesh=dist.mesh("tp"))
    if dist.dp_cp_size > 1:
        from tuneplex_automodel.parallel.fsdp import apply_fsdp

        separate = (base.get_decoder(), base.get_output_embeddings()) if separate_head else ()
        apply_fsdp(
            layers,
            root=root if root is not None else model,
            mesh=dist.mesh("dp_cp"),
            cuda=dist.device.type == "cuda",
            ignored=set(out.experts),
            separate=separate,
        )
    if dims.tp > 1:  # after FSDP, which replaces the parameters it shards
        from tuneplex_automodel.parallel.tp import partial_grad_params

        out.tp_partial = partial_grad_params(layers, modules=family.partial_grads)
    return out


def loss_function(dist: Dist, *, pad_id: int, separate_head: bool = False):
    """`loss(model, batch, autocast=...)`: this rank's part of the summed cross-entropy.

    The output head and the loss fused over chunks of the counted tokens (`chunked_loss_sum`:
    no full-vocabulary logits) in one process, with data and with tensor parallelism; context
    parallelism computes each rank's share of the sequence with the model's own forward. A
    head sharded as an FSDP unit of its own (`separate_head`) gathers its weight each time it
    is called, so it keeps the model's forward: one call on every rank.
    """
    from tuneplex.nn.evaluation import chunked_loss_sum, loss_sum

    if separate_head and dist.dp_cp_size > 1:
        return loss_sum
    if dist.dims.cp == 1:
        return chunked_loss_sum
    from tuneplex_automodel.parallel import cp

    return partial(cp.loss_sum, rank=dist.cp_rank, size=dist.dims.cp, pad_id=pad_id)
