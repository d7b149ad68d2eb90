"""One worker process of a multi-process job:
`python -m tuneplex_automodel.worker JOB_JSON RUN_DIR --launcher PID [--resume]`.

Started by `launch` with the resolved job in a node-local JSON file (users running torchrun
themselves run `tuneplex train` in every worker instead). The worker's life is tied to the
launcher's (PID, its parent) before anything else happens. It trains through
`trainer.train_here`: the launch was decided already, and a worker never launches.
Errors are printed once, by rank 0, one line each; the exit code says what kind they were.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    job_json, run_dir = Path(argv[0]), Path(argv[1])
    resume = "--resume" in argv[2:]
    if "--launcher" in argv:
        from tuneplex.signals import tie_to_parent

        tie_to_parent(int(argv[argv.index("--launcher") + 1]))
    from tuneplex import console
    from tuneplex.errors import TuneplexError
    from tuneplex.progress import quiet_third_party_logs
    from tuneplex.runs import LOG_FILE, hold_as_worker

    quiet_third_party_logs()
    rank = os.environ.get("RANK", "0")
    try:
        if rank == "0":  # keeps the run locked while stopping, should the launcher die first
            hold_as_worker(run_dir)
        with console.capture(run_dir / LOG_FILE, title=f"worker rank {rank}"):
            _train(job_json, run_dir, resume=resume)
    except TuneplexError as exc:
        if rank == "0":
            for line in exc.lines():
                print(line, file=sys.stderr, flush=True)
        return exc.exit_code
    return 0


def _train(job_json: Path, run_dir: Path, *, resume: bool) -> None:
    """Train, with output captured: an unexpected error's traceback goes to the run's log and
    becomes one line, as in `tuneplex train`."""
    from tuneplex import console
    from tuneplex.plugins import registry

    backend = registry().get("automodel").backend
    with console.defects_as_one_line():
        from tuneplex_automodel.trainer import train_here

        job = backend.job_schema.model_validate(json.loads(job_json.read_text(encoding="utf-8")))
        train_here(job, run_dir, resume=resume, data_spec=backend.data_spec(job))


if __name__ == "__main__":
    code = main()
    # The worker's work is done and written. Interpreter teardown can race a background thread
    # of torch's ("terminate called without an active exception", SIGABRT) and turn a finished
    # run into a failed one: leave without it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
