"""Test support: the backend contract suite every backend runs (`contract`), a fake backend
(`fake`), processes seen through /proc (`processes`) and the tiny model builder (`tiny`).

A backend's test module subclasses `BackendContract`::

    class TestMyBackend(BackendContract):
        backend_name = "mine"
        minimal_job = {...}          # the smallest valid job (required keys only)
"""

from tuneplex.testing.contract import (
    HEAVY_MODULES,
    BackendContract,
    assert_run_directory,
    imported_heavy_modules,
    reference_val_loss,
)
from tuneplex.testing.fake import FakeBackend, fake_entry_point
from tuneplex.testing.processes import child_pids, is_running

__all__ = [
    "HEAVY_MODULES",
    "BackendContract",
    "FakeBackend",
    "assert_run_directory",
    "child_pids",
    "fake_entry_point",
    "imported_heavy_modules",
    "is_running",
    "reference_val_loss",
]
