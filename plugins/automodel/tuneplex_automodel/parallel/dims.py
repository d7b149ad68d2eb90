"""The parallel layout of a job, derived once from the user's numbers.

The job says how many nodes and GPUs there are and how wide tensor, pipeline, context and
expert parallelism are; everything else (data-parallel width, gradient-accumulation steps)
follows and is computed here only. Importing this module does not import torch.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ParallelDims:
    num_nodes: int
    gpus_per_node: int
    tp: int
    pp: int
    cp: int
    ep: int
    global_batch_size: int
    micro_batch_size: int

    @property
    def world_size(self) -> int:
        return self.num_nodes * self.gpus_per_node

    @property
    def model_parallel_size(self) -> int:
        return self.tp * self.pp * self.cp

    @property
    def dp(self) -> int:
        return self.world_size // self.model_parallel_size

    @property
    def grad_accum_steps(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.dp)

    def problems(self) -> list[tuple[str, str]]:
        """Each broken rule as (dotted key, message naming the numbers), relative to the job."""
        out: list[tuple[str, str]] = []
        w, m = self.world_size, self.model_parallel_size
        if w % m:
            # named on each model-parallel size that is set: the keys a user would change
            sizes = (
                ("tensor_parallel_size", self.tp),
                ("pipeline_parallel_size", self.pp),
                ("context_parallel_size", self.cp),
            )
            message = (
                f"total GPUs (num_nodes × num_gpus_per_node = {self.num_nodes} × "
                f"{self.gpus_per_node} = {w}) must be divisible by tensor × pipeline × context "
                f"parallel size ({self.tp} × {self.pp} × {self.cp} = {m})"
            )
            out += [(f"parallelism.{key}", message) for key, size in sizes if size > 1]
        elif self.global_batch_size % (self.micro_batch_size * self.dp):
            per_step = self.micro_batch_size * self.dp
            out.append(
                (
                    "batch.global_batch_size",
                    f"{self.global_batch_size} must be divisible by micro_batch_size × "
                    f"data_parallel_size ({self.micro_batch_size} × {self.dp} = {per_step}); "
                    f"nearest valid: {_nearest_multiple(self.global_batch_size, per_step)}",
                )
            )
        if self.ep > 1 and self.tp != 1:
            out.append(
                (
                    "parallelism.tensor_parallel_size",
                    f"must be 1 when expert_parallel_size > 1 (got tensor_parallel_size={self.tp}, "
                    f"expert_parallel_size={self.ep})",
                )
            )
        if self.ep > 1 and not w % m and self.dp % self.ep:
            out.append(
                (
                    "parallelism.expert_parallel_size",
                    f"{self.ep} must divide data_parallel_size ({self.dp}): experts are split "
                    "across data-parallel ranks",
                )
            )
        out += [("parallelism", msg) for msg in self.unsupported()]
        return out

    def unsupported(self) -> list[str]:
        """Combinations this version does not train, each named."""
        used = {
            name
            for name, size in (
                ("pipeline", self.pp),
                ("context", self.cp),
                ("expert", self.ep),
            )
            if size > 1
        }
        out = []
        for pair in (("pipeline", "context"), ("pipeline", "expert"), ("context", "expert")):
            if set(pair) <= used:
                out.append(
                    f"{pair[0]} parallelism with {pair[1]} parallelism is not supported; set "
                    f"{pair[0]}_parallel_size or {pair[1]}_parallel_size to 1"
                )
        return out

    def describe(self) -> str:
        """ "dp 2 × pp 2" and so on: the dimensions wider than one (dp always)."""
        parts = [f"dp {self.dp}"]
        for name, size in (("tp", self.tp), ("pp", self.pp), ("cp", self.cp), ("ep", self.ep)):
            if size > 1:
                parts.append(f"{name} {size}")
        return " × ".join(parts)

    def as_dict(self) -> dict[str, int]:
        return {
            "total_gpus": self.world_size,
            "data_parallel_size": self.dp,
            "tensor_parallel_size": self.tp,
            "pipeline_parallel_size": self.pp,
            "context_parallel_size": self.cp,
            "expert_parallel_size": self.ep,
            "gradient_accumulation_steps": self.grad_accum_steps,
            "samples_per_micro_step": self.micro_batch_size * self.dp,
        }


def _nearest_multiple(value: int, unit: int) -> str:
    lower = (value // unit) * unit
    upper = lower + unit
    return f"{lower} or {upper}" if lower else str(upper)
