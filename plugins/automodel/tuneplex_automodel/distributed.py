"""Who this process is in a distributed run, the device mesh, and the collectives the loop needs.

One process (no torchrun) is a world of one with no process group and no mesh; under torchrun
every worker joins the group (NCCL on CUDA, gloo on CPU, where `num_gpus_per_node` means worker
processes) and builds a (dp, tp) DeviceMesh from the job's ParallelDims.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from tuneplex.errors import Problem, UsageError

from tuneplex_automodel.parallel_dims import ParallelDims


def under_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"))


@dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: Any
    dims: ParallelDims
    mesh: Any | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp_rank(self) -> int:
        return self.mesh["dp"].get_local_rank() if self.mesh is not None else 0

    @property
    def dp_size(self) -> int:
        return self.dims.dp

    @property
    def tp_size(self) -> int:
        return self.dims.tp

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    def sum_over_dp(self, tensor):
        """Sum a tensor over the data-parallel ranks (tensor-parallel peers hold equal values)."""
        if self.dp_size > 1:
            import torch.distributed as dist

            dist.all_reduce(tensor, group=self.mesh["dp"].get_group())
        return tensor

    def close(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def not_yet(dims: ParallelDims) -> list[Problem]:
    """Layouts this version cannot train yet (pipeline, context, expert parallel)."""
    out = []
    for key, value in (
        ("pipeline_parallel_size", dims.pp),
        ("context_parallel_size", dims.cp),
        ("expert_parallel_size", dims.ep),
    ):
        if value > 1:
            out.append(
                Problem(
                    f"parallelism.{key}",
                    f"{value}: this version of tuneplex-automodel trains with data and tensor "
                    "parallelism only; set it to 1",
                )
            )
    return out


def init(dims: ParallelDims, *, cuda: bool) -> Dist:
    import torch

    problems = not_yet(dims)
    if problems:
        raise UsageError(problems)
    if not under_torchrun():
        device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        return Dist(rank=0, world_size=1, local_rank=0, device=device, dims=dims)
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    world = int(os.environ["WORLD_SIZE"])
    if world != dims.world_size:
        raise UsageError(
            Problem(
                "parallelism",
                f"the job asks for {dims.world_size} processes ({dims.num_nodes} nodes × "
                f"{dims.gpus_per_node} per node); torchrun started {world}",
            )
        )
    local_rank = int(os.environ["LOCAL_RANK"])
    if cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    mesh = init_device_mesh(device.type, (dims.dp, dims.tp), mesh_dim_names=("dp", "tp"))
    return Dist(
        rank=dist.get_rank(),
        world_size=world,
        local_rank=local_rank,
        device=device,
        dims=dims,
        mesh=mesh,
    )


def clip_grad_norm(params, max_norm: float, *, device):
    """Total gradient norm over every rank's shards, then scale gradients to at most max_norm.

    Gradients may be plain tensors or DTensors on different meshes (FSDP's dp mesh, the 2-D
    (dp, tp) mesh of tensor-parallel weights); squares are summed locally and all-reduced over
    exactly the mesh dimensions a gradient is sharded on. Same result as torch's
    clip_grad_norm_ on one process.
    """
    import torch
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    groups: dict[Any, list] = {}
    meshes: dict[Any, Any] = {}
    for p in params:
        g = p.grad
        if g is None:
            continue
        if isinstance(g, DTensor):
            key = (id(g.device_mesh), tuple(g.placements))
            meshes[key] = g.device_mesh
            local = g.to_local()
        else:
            key, local = None, g
        groups.setdefault(key, []).append(local)
    total = torch.zeros((), dtype=torch.float32, device=device)
    for key, locals_ in groups.items():
        sq = torch.stack([t.float().pow(2).sum() for t in locals_]).sum()
        if key is not None:
            mesh, placements = meshes[key], key[1]
            for dim, placement in enumerate(placements):
                if not placement.is_replicate():  # Shard, _StridedShard (FSDP+TP), Partial
                    dist.all_reduce(sq, group=mesh.get_group(dim))
        total += sq
    norm = total.sqrt()
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for p in params:
        if p.grad is not None:
            g = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
            g.mul_(coef)
    return norm
