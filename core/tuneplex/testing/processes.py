"""Processes seen through /proc (Linux): how tests and benchmarks find a launcher's workers."""

from __future__ import annotations

import os


def _proc_stat(pid: int | str) -> list[str] | None:
    """/proc/PID/stat after the command name: [state, ppid, ...]; None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def child_pids(pid: int) -> list[int]:
    """The processes whose parent is `pid` (how tests and benchmarks find a launcher's workers)."""
    return [
        int(entry)
        for entry in os.listdir("/proc")
        if entry.isdigit() and (stat := _proc_stat(entry)) is not None and int(stat[1]) == pid
    ]


def is_running(pid: int) -> bool:
    """Running (a zombie waiting for a parent that never reaps it counts as gone)."""
    stat = _proc_stat(pid)
    return stat is not None and stat[0] != "Z"
