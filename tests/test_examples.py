"""Every example job in examples/ is valid for its backend."""

from pathlib import Path

import pytest
from tuneplex.plugins import registry
from tuneplex.schema.loading import load_job

EXAMPLES = Path(__file__).parents[1] / "examples"
JOBS = sorted(EXAMPLES.glob("*.yaml"))


def test_examples_are_found():
    """A glob that finds nothing would leave the test below with nothing to check."""
    assert JOBS, f"no example job (*.yaml) in {EXAMPLES}"


@pytest.mark.parametrize("path", JOBS, ids=lambda p: p.name)
def test_example_is_valid(path):
    backend = path.name.split("-")[0]
    load_job(registry().get(backend).backend.job_schema, path)
