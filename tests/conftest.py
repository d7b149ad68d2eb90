import os
import signal

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.hookimpl(trylast=True)  # after `-m` has deselected what will not run
def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` (tests/gpu: `pytestmark = pytest.mark.gpu`) are skipped where no CUDA
    GPU is visible. torch is imported only when such a test is about to run."""
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if gpu and not _cuda_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in gpu:
            item.add_marker(skip)


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


@pytest.fixture
def fake_registry(monkeypatch):
    """The installed backends plus the fake one, as the CLI will see them."""
    from importlib import metadata

    from tuneplex import plugins
    from tuneplex.testing import fake_entry_point

    eps = [*metadata.entry_points(group=plugins.ENTRY_POINT_GROUP), fake_entry_point()]
    reg = plugins.load_registry(eps)
    monkeypatch.setattr(plugins, "registry", lambda: reg)
    return reg


@pytest.fixture
def write(tmp_path):
    """write("name.yaml", text) -> path, in the test's temporary directory."""

    def _write(name: str, text: str):
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        return path

    return _write


@pytest.fixture(scope="session")
def tokenizers(tmp_path_factory):
    """Three locally trained tokenizers, one per chat template style: {style: (path, tok)}."""
    from tuneplex.testing.tiny import STYLES, build_tokenizer

    root = tmp_path_factory.mktemp("tokenizers")
    return {s: (str(root / s), build_tokenizer(root / s, style=s)) for s in STYLES}


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Each test gets its own token cache directory."""
    monkeypatch.setenv("TUNEPLEX_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="session")
def tiny_model(tokenizers, tmp_path_factory):
    """A random-init 2-layer Llama (fp32, safetensors) with the ChatML tokenizer: its path."""
    from tuneplex.testing.tiny import build_llama

    out = tmp_path_factory.mktemp("tiny-llama")
    build_llama(out, tokenizer=tokenizers["chatml"][1], hidden=64, layers=2, init_std=0.1)
    return str(out)


@pytest.fixture(autouse=True)
def _restore_signals():
    """In-process runs that stop leave SIGINT / SIGTERM ignored (the process is about to exit);
    restored here, so that no later test, nor the processes it starts, inherits that."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


@pytest.fixture
def cpu_seam(monkeypatch):
    """PeftLoader in place of UnslothLoader, and the GPU requirement lifted."""
    import tuneplex_unsloth.trainer as trainer
    from tuneplex.backend import EnvironmentStatus
    from tuneplex.plugins import registry
    from tuneplex_unsloth.model import PeftLoader

    monkeypatch.setattr(trainer, "LOADER", PeftLoader)
    backend = registry().backends["unsloth"].backend
    monkeypatch.setattr(
        type(backend), "check_environment", lambda self: EnvironmentStatus(True, "test")
    )
