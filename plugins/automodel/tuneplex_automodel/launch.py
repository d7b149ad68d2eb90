"""Starting the workers of a multi-process job with torch's own launcher (torchrun's engine).

`tuneplex train` on a job with several processes per node or several nodes calls `launch`, which
starts `num_gpus_per_node` workers on this node through `torch.distributed.launcher` and waits.
Rendezvous settings come from `tuneplex train`'s flags (handed down as `LaunchOptions`), else
from Slurm's variables, else a single-node run on localhost. Started by torchrun already, a
worker just joins (see distributed.init); the workers started here need no options.

Workers never outlive the launcher: each ties itself to it (tuneplex.signals.tie_to_parent),
so a launcher killed outright (SIGKILL, the OOM killer) takes them along. SIGINT or SIGTERM to
the launcher reaches every worker once; they stop together at the same step with a
checkpoint, and the launcher exits 130 or 143 once they are done (SIGKILL after STOP_GRACE_S).
"""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import sys
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path

from tuneplex import console
from tuneplex.backend import LaunchOptions
from tuneplex.errors import Problem, TuneplexError, UsageError
from tuneplex.signals import STOP_GRACE_S, StopSignals, exit_code

from tuneplex_automodel.parallel.dims import ParallelDims


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


def rendezvous(
    dims: ParallelDims, *, options: LaunchOptions, env: Mapping[str, str] = os.environ
) -> dict:
    """{"backend", "endpoint", "node_rank"} for this node: the flags in `options` first, then
    Slurm's variables in `env`."""
    if options.rdzv_endpoint:
        return {"backend": "c10d", "endpoint": options.rdzv_endpoint, "node_rank": None}
    node_rank = options.node_rank if options.node_rank is not None else env.get("SLURM_NODEID")
    addr = options.master_addr
    if addr is None and env.get("SLURM_JOB_NODELIST") and dims.num_nodes > 1:
        addr = expand_nodelist(env["SLURM_JOB_NODELIST"])[0]
    port = options.master_port or (29500 if dims.num_nodes > 1 else None)
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


def launch(
    dims: ParallelDims, job: dict, run_dir: Path, *, resume: bool, options: LaunchOptions
) -> None:
    """Run `job` (its resolved JSON form) on this node's workers and wait for them."""
    import json
    import tempfile

    from torch.distributed.launcher.api import LaunchConfig

    rdzv = rendezvous(dims, options=options)
    configs = {"rank": rdzv["node_rank"]} if rdzv["backend"] == "static" else {}
    config = LaunchConfig(
        min_nodes=dims.num_nodes,
        max_nodes=dims.num_nodes,
        nproc_per_node=dims.gpus_per_node,
        run_id=os.environ.get("SLURM_JOB_ID") or "tuneplex",  # the same on every node
        rdzv_backend=rdzv["backend"],
        rdzv_endpoint=rdzv["endpoint"],
        rdzv_configs=configs,
        max_restarts=0,
        monitor_interval=0.2,
        shutdown_timeout=STOP_GRACE_S,
        signals_to_handle="SIGHUP,SIGQUIT",  # SIGINT and SIGTERM: _signals_to_workers
    )
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory(prefix="tuneplex-") as tmp:
        job_json = Path(tmp) / "job.json"  # a private directory: it may hold secrets
        job_json.write_text(json.dumps(job), encoding="utf-8")
        args = ["-m", "tuneplex_automodel.worker", str(job_json), str(run_dir)]
        args += ["--launcher", str(os.getpid())] + (["--resume"] if resume else [])
        with console.released():  # the workers capture their own output into the run's log
            _run(config, args)


def _run(config, args: list[str]) -> None:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch

    for name in list(logging.root.manager.loggerDict):  # they set their own levels
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        with _signals_to_workers():
            elastic_launch(config, entrypoint=sys.executable)(*args)
    except SignalException as exc:  # the workers got the signal too, and have stopped
        raise WorkersFailed(exit_code(exc.sigval)) from None
    except ChildFailedError as exc:
        codes = [f.exitcode for f in exc.failures.values()]
        code = next((c for c in codes if c in (1, 2, 130, 143)), codes[0] if codes else 1)
        raise WorkersFailed(code if code > 0 else 1) from None
    except KeyboardInterrupt:
        raise WorkersFailed(130) from None


@contextmanager
def _signals_to_workers():
    """The first SIGINT / SIGTERM raises torch elastic's SignalException, on which its agent
    sends that signal to every worker and waits for them (SIGKILL after STOP_GRACE_S); later
    ones are ignored, so they cannot cut that wait short and leave workers behind (torch
    elastic's own handler, which would raise again, keeps only SIGHUP and SIGQUIT)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException

    def error(signum: int) -> BaseException:
        return SignalException(f"got {signum}", sigval=signal.Signals(signum))

    with StopSignals(say=console.note, error=error):
        yield
