"""Starting the workers of a multi-process job with torch's own launcher (torchrun's engine).

`tuneplex train` on a job with several processes per node or several nodes calls `launch`, which
starts `num_gpus_per_node` workers on this node through `torch.distributed.launcher` and waits.
Rendezvous settings come from `tuneplex train` flags (exported as TUNEPLEX_* variables), else
from Slurm's variables, else a single-node run on localhost. Started by torchrun already, a
worker just joins (see distributed.init).
"""

from __future__ import annotations

import logging
import os
import re
import socket
import sys
from pathlib import Path

from tuneplex.errors import Problem, TuneplexError, UsageError

from tuneplex_automodel.parallel_dims import ParallelDims


class WorkersFailed(TuneplexError):
    """A worker exited with an error; it has printed the message itself (rank 0)."""

    def __init__(self, exit_code: int):
        super().__init__([])
        self.exit_code = exit_code


def expand_nodelist(nodelist: str) -> list[str]:
    """Slurm's compressed host list: "gpu[01-03,07],login" -> gpu01 gpu02 gpu03 gpu07 login."""
    hosts: list[str] = []
    for prefix, ranges, plain in re.findall(r"([^,\[]+)\[([^\]]+)\]|([^,\[\]]+)", nodelist):
        if plain:
            hosts.append(plain)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            if hi:
                hosts.extend(f"{prefix}{i:0{len(lo)}d}" for i in range(int(lo), int(hi) + 1))
            else:
                hosts.append(prefix + lo)
    return hosts


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rendezvous(dims: ParallelDims, env=os.environ) -> dict:
    """{"backend", "endpoint", "node_rank"} for this node."""
    endpoint = env.get("TUNEPLEX_RDZV_ENDPOINT")
    if endpoint:
        return {"backend": "c10d", "endpoint": endpoint, "node_rank": None}
    node_rank = env.get("TUNEPLEX_NODE_RANK") or env.get("SLURM_NODEID")
    addr = env.get("TUNEPLEX_MASTER_ADDR")
    if addr is None and env.get("SLURM_JOB_NODELIST") and dims.num_nodes > 1:
        addr = expand_nodelist(env["SLURM_JOB_NODELIST"])[0]
    port = env.get("TUNEPLEX_MASTER_PORT") or ("29500" if dims.num_nodes > 1 else None)
    if dims.num_nodes > 1:
        missing = [
            flag
            for flag, value in (("--node-rank", node_rank), ("--master-addr", addr))
            if value is None
        ]
        if missing:
            raise UsageError(
                Problem(
                    "parallelism.num_nodes",
                    f"{dims.num_nodes} nodes need {' and '.join(missing)} on every node (or "
                    "--rdzv-endpoint HOST:PORT, or Slurm's SLURM_NODEID / SLURM_JOB_NODELIST)",
                )
            )
        if not 0 <= int(node_rank) < dims.num_nodes:
            raise UsageError(
                Problem("--node-rank", f"{node_rank} is not in 0..{dims.num_nodes - 1}")
            )
    addr = addr or "127.0.0.1"
    port = port or str(_free_port())
    return {"backend": "static", "endpoint": f"{addr}:{port}", "node_rank": int(node_rank or 0)}


def launch(dims: ParallelDims, job: dict, run_dir: Path, *, resume: bool) -> None:
    """Run `job` (its resolved JSON form) on this node's workers and wait for them."""
    import json
    import tempfile

    from torch.distributed.launcher.api import LaunchConfig

    rdzv = rendezvous(dims)
    configs = {"rank": rdzv["node_rank"]} if rdzv["backend"] == "static" else {}
    config = LaunchConfig(
        min_nodes=dims.num_nodes,
        max_nodes=dims.num_nodes,
        nproc_per_node=dims.gpus_per_node,
        run_id=os.environ.get("TUNEPLEX_RUN_ID") or os.environ.get("SLURM_JOB_ID") or "tuneplex",
        rdzv_backend=rdzv["backend"],
        rdzv_endpoint=rdzv["endpoint"],
        rdzv_configs=configs,
        max_restarts=0,
        monitor_interval=0.2,
    )
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory(prefix="tuneplex-") as tmp:
        job_json = Path(tmp) / "job.json"  # a private directory: it may hold secrets
        job_json.write_text(json.dumps(job), encoding="utf-8")
        args = ["-m", "tuneplex_automodel.worker", str(job_json), str(run_dir)]
        _run(config, args + (["--resume"] if resume else []))


def _run(config, args: list[str]) -> None:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch

    try:
        elastic_launch(config, entrypoint=sys.executable)(*args)
    except ChildFailedError as exc:
        codes = [f.exitcode for f in exc.failures.values()]
        code = next((c for c in codes if c in (1, 2, 130)), codes[0] if codes else 1)
        raise WorkersFailed(code if code > 0 else 1) from None
    except KeyboardInterrupt:
        raise WorkersFailed(130) from None
