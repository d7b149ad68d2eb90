"""Who this process is in a distributed run, the device mesh, and the collectives the loop needs.

One process (no torchrun) is a world of one with no process group and no mesh; under torchrun
every worker joins the group (NCCL on CUDA, gloo on CPU, where `num_gpus_per_node` means worker
processes) and builds one DeviceMesh from the job's ParallelDims, outermost first:
(pp, edp, ep, cp, tp). Expert parallelism borrows its ranks from data parallelism, so the
data-parallel dimension is the flattened (edp, ep); FSDP shards over the flattened
(edp, ep, cp) = "dp_cp", since context-parallel peers hold the same weights and their
gradients add up like those of data-parallel peers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from tuneplex.errors import Problem, UsageError

from tuneplex_automodel.parallel.dims import ParallelDims


def under_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"))


@dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: Any
    dims: ParallelDims
    meshes: dict[str, Any] | None = None
    """1-D meshes by name: pp, edp, ep, cp, tp and the flattened dp, dp_cp."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def mesh(self, dim: str):
        return self.meshes[dim]

    def local_rank_in(self, dim: str) -> int:
        return self.meshes[dim].get_local_rank() if self.meshes is not None else 0

    def group(self, dim: str):
        return self.meshes[dim].get_group()

    @property
    def dp_rank(self) -> int:
        return self.local_rank_in("dp")

    @property
    def dp_size(self) -> int:
        return self.dims.dp

    @property
    def tp_size(self) -> int:
        return self.dims.tp

    @property
    def cp_rank(self) -> int:
        return self.local_rank_in("cp")

    @property
    def pp_rank(self) -> int:
        return self.local_rank_in("pp")

    @property
    def dp_cp_size(self) -> int:
        """Ranks whose gradients are averaged by FSDP: data parallel × context parallel."""
        return self.dims.dp * self.dims.cp

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    def sum_over_data(self, tensor):
        """Sum a tensor over the data- and context-parallel ranks (tensor-parallel peers hold
        equal values; pipeline stages are summed separately where they differ)."""
        if self.dp_cp_size > 1:
            import torch.distributed as dist

            dist.all_reduce(tensor, group=self.group("dp_cp"))
        return tensor

    def sum_over_stages(self, tensor):
        """Sum over the pipeline stages (a value only one stage holds reaches them all)."""
        if self.dims.pp > 1:
            import torch.distributed as dist

            dist.all_reduce(tensor, group=self.group("pp"))
        return tensor

    def max_over_ranks(self, value: int) -> int:
        """The largest of every rank's `value`: what one rank knows (a stop signal it got)
        reaches them all. One small all-reduce over the whole world."""
        if self.world_size == 1:
            return value
        import torch
        import torch.distributed as dist

        flag = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())

    def close(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


MESH_DIMS = ("pp", "edp", "ep", "cp", "tp")


def build_meshes(dims: ParallelDims, device_type: str) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh

    shape = (dims.pp, dims.dp // dims.ep, dims.ep, dims.cp, dims.tp)
    mesh = init_device_mesh(device_type, shape, mesh_dim_names=MESH_DIMS)
    out = {name: mesh[name] for name in MESH_DIMS}
    out["dp"] = mesh["edp", "ep"]._flatten("dp")
    out["dp_cp"] = mesh["edp", "ep", "cp"]._flatten("dp_cp")
    return out


def init(dims: ParallelDims, *, cuda: bool) -> Dist:
    import torch

    if not under_torchrun():
        device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        return Dist(rank=0, world_size=1, local_rank=0, device=device, dims=dims)
    import torch.distributed as dist

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
    return Dist(
        rank=dist.get_rank(),
        world_size=world,
        local_rank=local_rank,
        device=device,
        dims=dims,
        meshes=build_meshes(dims, device.type),
    )


def clip_grad_norm(params, max_norm: float, *, device, sum_over_stages=None):
    """Total gradient norm over every rank's shards, then scale gradients to at most max_norm.

    Gradients may be plain tensors or DTensors on different meshes (FSDP's dp mesh, the 2-D
    (dp, tp) mesh of tensor-parallel weights); squares are summed locally and all-reduced over
    exactly the mesh dimensions a gradient is sharded on, then over the pipeline stages (each
    holds other parameters) with `sum_over_stages`. Same result as torch's clip_grad_norm_ on
    one process.
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
    if sum_over_stages is not None:
        total = sum_over_stages(total)
    norm = total.sqrt()
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for p in params:
        if p.grad is not None:
            g = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
            g.mul_(coef)
    return norm
