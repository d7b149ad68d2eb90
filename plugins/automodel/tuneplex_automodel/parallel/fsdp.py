"""FSDP2 (`fully_shard`): every decoder layer, then the root, sharded over the data × context
ranks. On CUDA parameters are gathered in bf16 and gradients reduced in fp32."""

from __future__ import annotations

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
