"""FSDP2 (`fully_shard`): every decoder layer, then the root, sharded over the data × context
ranks. On CUDA parameters are gathered in bf16 and gradients reduced in fp32."""

from __future__ import annotations

import contextlib
from typing import Any


def apply_fsdp(
    layers: list[Any],
    *,
    root,
    mesh,
    cuda: bool,
    ignored: set | None = None,
    separate: tuple[Any, ...] = (),
) -> None:
    """Shard `layers`, then each module of `separate` (units the loop calls on their own), then
    `root` (the module whose forward runs). `ignored`: parameters sharded otherwise (experts)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kw: dict[str, Any] = {"mesh": mesh}
    if cuda:
        import torch

        kw["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32
        )
    if ignored:
        kw["ignored_params"] = ignored
    for i, layer in enumerate(layers):
        # the last layer's parameters are needed again at once by the root: keep them
        fully_shard(layer, reshard_after_forward=i < len(layers) - 1, **kw)
    for module in separate:
        fully_shard(module, **kw)
    fully_shard(root, **kw)


def fsdp_units(model) -> list[Any]:
    """The FSDP2 units of `model`, root first (none where it is not sharded)."""
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def gathered(model, units: list[Any] | None = None):
    """Every FSDP2 unit of `model` (`units`, when already known) unsharded once, and kept so
    through any number of forward passes (generation: each rank then runs as many as its own
    completions need, with no collective); resharded, with each unit's own after-forward
    setting, on leaving. A model without FSDP2 units is left as it is."""
    units = fsdp_units(model) if units is None else units
    if not units:
        yield
        return
    # the root's first forward settles which units reshard after forward (the root does not):
    # settled now, so that what is saved below is what training uses
    units[0]._get_fsdp_state()._lazy_init()
    # the after-forward resharding of each parameter group (the public setter can only set
    # one value for all)
    saved = []
    for unit in units:
        state = unit._get_fsdp_state()
        groups = [(g, g.post_forward_mesh_info) for g in state._fsdp_param_groups]
        saved.append((state, state._auto_reshard_after_forward, groups))
        unit.set_reshard_after_forward(False, recurse=False)
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        for state, auto, groups in saved:
            state._auto_reshard_after_forward = auto
            for group, info in groups:
                group.post_forward_mesh_info = info
        for unit in units:
            unit.reshard()
