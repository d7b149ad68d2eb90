"""Wall time of the CLI's fast-path commands, as a user sees them (a fresh process each run).

    python bench/cli_latency.py [--runs 7] [--json out.json]

Prints one row per command (median and worst of N runs) and exits 1 if any median is over
the 0.5 s target.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_S = 0.5

AUTOMODEL_JOB = "model: org/base\ndataset:\n  training: train.jsonl\n"
UNSLOTH_JOB = "model:\n  name: org/base\ndataset:\n  path: train.jsonl\n"
V1_FILE = '{"finetuning_type": "lora", "lora": {"target_modules": ["linear_qkv"]}}'


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    args = parser.parse_args()

    exe = shutil.which("tuneplex", path=str(Path(sys.executable).parent)) or shutil.which(
        "tuneplex"
    )
    if exe is None:
        print("the tuneplex console script is not installed", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp())
    (tmp / "a.yaml").write_text(AUTOMODEL_JOB)
    (tmp / "u.yaml").write_text(UNSLOTH_JOB)
    (tmp / "v1.json").write_text(V1_FILE)
    commands = {
        "tuneplex --version": ["--version"],
        "tuneplex backends": ["backends"],
        "tuneplex schema automodel": ["schema", "automodel"],
        "tuneplex schema unsloth --format yaml": ["schema", "unsloth", "--format", "yaml"],
        "tuneplex validate a.yaml": ["validate", str(tmp / "a.yaml")],
        "tuneplex validate u.yaml --backend unsloth": [
            "validate",
            str(tmp / "u.yaml"),
            "--backend",
            "unsloth",
        ],
        "tuneplex migrate v1.json": ["migrate", str(tmp / "v1.json")],
    }
    rows = []
    for label, argv in commands.items():
        times = []
        for _ in range(args.runs + 1):  # the first run warms the page cache; not counted
            start = time.perf_counter()
            done = subprocess.run([exe, *argv], capture_output=True)
            times.append(time.perf_counter() - start)
            if done.returncode != 0:
                print(f"{label}: exit {done.returncode}: {done.stderr.decode()}", file=sys.stderr)
                return 1
        times = times[1:]
        rows.append({"command": label, "median_s": statistics.median(times), "max_s": max(times)})
    width = max(len(r["command"]) for r in rows)
    print(f"{'command':<{width}}  median   worst   (target < {TARGET_S:.1f} s, {args.runs} runs)")
    for r in rows:
        flag = "" if r["median_s"] < TARGET_S else "  OVER TARGET"
        print(f"{r['command']:<{width}}  {r['median_s']:.3f}s  {r['max_s']:.3f}s{flag}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0 if all(r["median_s"] < TARGET_S for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
