"""Context and expert parallelism through `tuneplex train` (CPU, gloo) equal one process.

Context parallel: a tiny Llama with packed rows (several samples per sequence) and with padded
rows, the sequence split across 2 ranks, alone and with data parallelism (4 processes). Expert
parallel: tiny Qwen3-MoE and Mixtral models (4 experts, top-2) with their experts split across
2 data-parallel ranks. Every train and validation loss, gradient norm and final/ weight is
compared with the one-process run of the same job.
"""

from __future__ import annotations

import shutil

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from helpers import (  # noqa: E402
    assert_same_final,
    assert_same_run,
    cli,
    layout,
    load_final,
    parallel_job,
)
from tuneplex.testing import assert_run_directory  # noqa: E402


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tokenizers, tiny_model):
    from tuneplex.testing.tiny import build_moe

    root = tmp_path_factory.mktemp("cp-ep")
    tok = tokenizers["chatml"][1]
    build_moe(root / "qwen3-moe", tokenizer=tok, init_std=0.1)
    build_moe(root / "mixtral", family="mixtral", tokenizer=tok, init_std=0.1)
    (root / "llama").symlink_to(tiny_model)
    return root


def job(root, *, model: str, ft: str, packed: bool):
    # packed: the 14 rows become a handful of sequences, 2 per step
    name = f"{model}-{ft}-{'packed' if packed else 'rows'}"
    return parallel_job(
        root, name, model=root / model, ft=ft, gbs=2 if packed else 4, packed=packed
    )


@pytest.fixture(scope="module")
def single(workdir):
    """One-process reference runs, made on first use."""
    runs = {}

    def get(model: str, ft: str, packed: bool):
        key = (model, ft, packed)
        if key not in runs:
            runs[key] = workdir / f"single-{model}-{ft}-{packed}"
            cli(job(workdir, model=model, ft=ft, packed=packed), "-o", runs[key])
        return runs[key]

    return get


@pytest.mark.slow
@pytest.mark.parametrize(
    ("ft", "packed", "procs", "shown"),
    [
        ("lora", True, 2, "2 processes (dp 1 × cp 2)"),
        ("all_weights", True, 2, "2 processes (dp 1 × cp 2)"),
        ("all_weights", False, 4, "4 processes (dp 2 × cp 2)"),
    ],
    ids=["cp2-lora-packed", "cp2-full-packed", "dp2xcp2-full"],
)
def test_context_parallel_equals_one_process(workdir, single, ft, packed, procs, shown):
    reference = single("llama", ft, packed)
    run = workdir / f"cp2-p{procs}-{ft}-{packed}"
    spec = job(workdir, model="llama", ft=ft, packed=packed)
    proc = cli(spec, "-o", run, *layout(procs, context_parallel_size=2))
    assert shown in proc.stdout
    assert_run_directory(run)
    assert_same_run(reference, run)
    assert_same_final(reference, run)
    load_final(run, ft)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("model", "ft", "procs"),
    [
        ("qwen3-moe", "all_weights", 2),
        ("qwen3-moe", "lora", 2),
        ("mixtral", "all_weights", 2),
        ("qwen3-moe", "all_weights", 4),  # each expert shard on 2 data-parallel ranks
    ],
    ids=["qwen3-moe-full", "qwen3-moe-lora", "mixtral-full", "dp4xep2-qwen3-moe-full"],
)
def test_expert_parallel_equals_one_process(workdir, single, model, ft, procs):
    reference = single(model, ft, False)
    run = workdir / f"ep2-p{procs}-{model}-{ft}"
    spec = job(workdir, model=model, ft=ft, packed=False)
    proc = cli(spec, "-o", run, *layout(procs, expert_parallel_size=2))
    assert f"{procs} processes (dp {procs} × ep 2)" in proc.stdout
    assert_run_directory(run)
    assert_same_run(reference, run)
    assert_same_final(reference, run)
    load_final(run, ft)
    if (model, ft, procs) == ("qwen3-moe", "all_weights", 2):  # sharded experts come back
        shutil.rmtree(run / "checkpoints" / "step_4")
        shutil.rmtree(run / "final")
        cli(spec, "-o", run, "--resume", *layout(2, expert_parallel_size=2))
        assert_same_run(reference, run)
        assert_same_final(reference, run)


@pytest.mark.slow
def test_expert_parallel_needs_experts_it_divides(workdir, tokenizers, tmp_path):
    from tuneplex.testing.tiny import build_moe

    build_moe(tmp_path / "three", tokenizer=tokenizers["chatml"][1], experts=3)
    spec = tmp_path / "job.yaml"
    spec.write_text(
        job(workdir, model="llama", ft="lora", packed=False)
        .read_text()
        .replace(str(workdir / "llama"), str(tmp_path / "three"))
    )
    proc = cli(spec, "-o", tmp_path / "r", *layout(2, expert_parallel_size=2), check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("parallelism.expert_parallel_size: "), lines
    assert "3" in lines[0] and "2" in lines[0]
    dense = job(workdir, model="llama", ft="lora", packed=False)
    proc = cli(dense, "-o", tmp_path / "d", *layout(2, expert_parallel_size=2), check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "LlamaForCausalLM is not a mixture-of-experts model" in lines[0]
