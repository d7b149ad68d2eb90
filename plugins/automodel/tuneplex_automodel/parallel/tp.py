"""Tensor parallelism (DTensor): one family plan applied to every decoder layer.

Each decoder layer needs one all-reduce forward and one backward per block (`colwise` then
`rowwise`); embeddings, norms and the output head are replicated. `finish_grads` completes the
gradients of the replicated weights that sit after a column split (see `plans.Family`).
"""

from __future__ import annotations

from typing import Any

from tuneplex.errors import Problem, UsageError

KEY = "parallelism.tensor_parallel_size"


def check_divisible(config, tp: int, *, sizes: tuple[str, ...]) -> None:
    problems = []
    for attr in sizes:
        value = getattr(config, attr, None)
        if value is not None and value % tp:
            problems.append(Problem(KEY, f"{tp} does not divide the model's {attr} ({value})"))
    if problems:
        raise UsageError(problems)


def style(name: str):
    """The torch ParallelStyle of a plan's style name."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    if name == "colwise":
        return ColwiseParallel()
    if name == "rowwise":
        return RowwiseParallel()
    if name == "colwise_gather":
        return ColwiseParallel(output_layouts=Replicate())
    if name == "rowwise_split":
        return RowwiseParallel(input_layouts=Replicate())
    raise ValueError(f"unknown tensor-parallel style {name!r}")


def apply_tp(layers: list[Any], *, plan: dict[str, str], mesh) -> None:
    """Apply `plan` (module path inside a layer -> style name) to each layer over `mesh`.
    Entries for modules a layer does not have are skipped (LoRA may target only some)."""
    from torch.distributed.tensor.parallel import parallelize_module

    for layer in layers:
        names = {n for n, _ in layer.named_modules()}
        present = {k: style(v) for k, v in plan.items() if k in names}
        if present:
            parallelize_module(layer, mesh, present)


def partial_grad_params(layers: list[Any], *, modules: tuple[str, ...]) -> list[Any]:
    """The trainable parameters of these modules of each layer (see `plans.Family`)."""
    out = []
    for layer in layers:
        for path in modules:
            try:
                mod = layer.get_submodule(path)
            except AttributeError:
                continue
            out += [p for p in mod.parameters() if p.requires_grad]
    return out


def finish_grads(params: list[Any], *, group) -> None:
    """Sum the partial gradients of `params` over the tensor-parallel `group`."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    for p in params:
        if p.grad is None:
            continue
        g = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
        dist.all_reduce(g, group=group)
