"""Every installed backend runs the core's contract suite."""

import pytest
from tuneplex.testing import BackendContract, imported_heavy_modules


class TestAutomodelContract(BackendContract):
    backend_name = "automodel"
    minimal_job = {"model": "org/base", "dataset": {"training": "train.jsonl"}}


class TestUnslothContract(BackendContract):
    backend_name = "unsloth"
    minimal_job = {"model": {"name": "org/base"}, "dataset": {"path": "train.jsonl"}}
    model_key = "model.name"


class TestFakeContract(BackendContract):
    backend_name = "fake"
    minimal_job = {"model": "m", "dataset": {"path": "d.jsonl"}}

    @pytest.fixture(autouse=True)
    def _fake(self, fake_registry):
        return fake_registry

    def test_discovered_through_entry_point(self, fake_registry):
        assert fake_registry.get("fake").plugin == "fake"

    def test_environment_check_is_cheap(self):
        assert self.backend.check_environment().ready

    def test_describe_is_cheap(self):  # the fake is not installed: built here, not discovered
        heavy = imported_heavy_modules(
            f"""
            from tuneplex.testing.fake import FakeBackend
            backend = FakeBackend()
            backend.describe(backend.job_schema.model_validate({self.minimal_job!r}))
            """
        )
        assert heavy == []
