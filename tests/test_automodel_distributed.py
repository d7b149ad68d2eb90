"""Data and tensor parallelism on CPU (gloo, 2-4 worker processes) equal one process.

Every parallel run goes through `tuneplex train` itself, which starts its workers with torch's
elastic launcher; results are compared with the single-process run of the same job.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from helpers import (  # noqa: E402
    assert_same_final,
    assert_same_run,
    cli,
    free_port,
    layout,
    load_final,
    parallel_job,
    reference_runs,
)
from tuneplex.testing import assert_run_directory  # noqa: E402


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("dist")
    for ft in ("lora", "all_weights"):
        parallel_job(root, ft, model=tiny_model, ft=ft)
    return root


@pytest.fixture(scope="module")
def single(workdir):
    """The one-process reference run of each finetuning type."""
    return reference_runs(workdir)


@pytest.mark.slow
@pytest.mark.parametrize("ft", ["lora", "all_weights"])
@pytest.mark.parametrize(("procs", "tp"), [(2, 1), (2, 2), (4, 2)], ids=["dp2", "tp2", "dp2xtp2"])
def test_parallel_run_equals_one_process(workdir, single, ft, procs, tp):
    run = workdir / f"p{procs}-tp{tp}-{ft}"
    proc = cli(
        workdir / f"{ft}.yaml",
        "-o",
        run,
        "--set",
        f"parallelism.num_gpus_per_node={procs}",
        "--set",
        f"parallelism.tensor_parallel_size={tp}",
    )
    shown = f"dp {procs // tp}" + (f" × tp {tp}" if tp > 1 else "")
    assert f"{procs} processes ({shown}) on cpu" in proc.stdout
    assert_run_directory(run)
    assert_same_run(single[ft], run)
    assert_same_final(single[ft], run)
    load_final(run, ft)


@pytest.mark.slow
@pytest.mark.parametrize(("procs", "tp"), [(2, 1), (2, 2)], ids=["dp2", "tp2"])
def test_activation_checkpointing_under_parallelism(workdir, single, procs, tp):
    """Layers recomputed in backward under FSDP2 (data parallel) and DTensor (tensor parallel):
    the one-process run without it, again."""
    run = workdir / f"ac-p{procs}-tp{tp}"
    cli(
        workdir / "all_weights.yaml",
        "-o",
        run,
        *layout(procs, tensor_parallel_size=tp),
        "--set",
        "training.activation_checkpointing=full",
    )
    assert_same_run(single["all_weights"], run)
    assert_same_final(single["all_weights"], run)


@pytest.mark.slow
def test_resume_across_ranks(workdir, single):
    """Data-parallel run resumed from a checkpoint written by rank 0 and read by every rank."""
    import shutil

    run = workdir / "dp2-resumed"
    args = ["--set", "parallelism.num_gpus_per_node=2"]
    cli(workdir / "all_weights.yaml", "-o", run, *args)
    shutil.rmtree(run / "checkpoints" / "step_4")
    shutil.rmtree(run / "final")
    cli(workdir / "all_weights.yaml", "-o", run, "--resume", *args)
    assert_same_run(single["all_weights"], run)
    assert_same_final(single["all_weights"], run)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("was", "now", "said"),
    [
        ((2, 1), (1, 1), "2 processes (dp 2); resharded onto 1 process (dp 1)"),
        ((2, 1), (4, 1), "2 processes (dp 2); resharded onto 4 processes (dp 4)"),
        ((2, 2), (2, 1), "2 processes (dp 1 × tp 2); resharded onto 2 processes (dp 2)"),
    ],
    ids=["dp2-to-dp1", "dp2-to-dp4", "tp2-to-dp2"],
)
def test_resume_onto_another_layout(workdir, single, was, now, said):
    """A checkpoint of one layout resumed with another (only `parallelism` changed, by --set):
    DCP reshards it; the global batch, and so the losses, stay the one-process run's."""
    import shutil

    run = workdir / f"reshard-{was}-{now}"
    cli(workdir / "all_weights.yaml", "-o", run, *layout(was[0], tensor_parallel_size=was[1]))
    shutil.rmtree(run / "checkpoints" / "step_4")
    shutil.rmtree(run / "final")
    proc = cli(
        workdir / "all_weights.yaml",
        "-o",
        run,
        "--resume",
        *layout(now[0], tensor_parallel_size=now[1]),
    )
    assert f"tuneplex: checkpoints/step_2 was written by {said}" in proc.stderr.splitlines()[0]
    assert_same_run(single["all_weights"], run)
    assert_same_final(single["all_weights"], run)


@pytest.mark.slow
def test_two_nodes_on_localhost(workdir, single):
    run = workdir / "two-nodes"
    port = free_port()
    common = [
        workdir / "lora.yaml",
        "-o",
        run,
        "--set",
        "parallelism.num_nodes=2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        port,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "tuneplex", "train", *map(str, common), "--node-rank", str(r)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for r in (0, 1)
    ]
    outs = [n.communicate(timeout=600) for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], [o[1][-3000:] for o in outs]
    assert "2 processes (dp 2) on cpu" in outs[0][0]
    assert outs[1][0].strip() == ""  # only global rank 0 prints
    assert_same_run(single["lora"], run)
    assert_same_final(single["lora"], run)


@pytest.mark.parametrize(
    ("sets", "line"),
    [
        (  # no rendezvous settings for a second node
            ["parallelism.num_nodes=2"],
            "parallelism.num_nodes: 2 nodes need --node-rank and --master-addr on every node (or "
            "--rdzv-endpoint HOST:PORT, or Slurm's SLURM_NODEID / SLURM_JOB_NODELIST)",
        ),
        (  # a combination this version refuses before launching
            [
                "parallelism.num_gpus_per_node=4",
                "parallelism.pipeline_parallel_size=2",
                "parallelism.context_parallel_size=2",
            ],
            "parallelism: pipeline parallelism with context parallelism is not supported; set "
            "pipeline_parallel_size or context_parallel_size to 1",
        ),
        pytest.param(  # an error inside the workers, printed once by rank 0
            [
                "parallelism.num_gpus_per_node=2",
                "parallelism.tensor_parallel_size=2",
                "training.lora.target_modules=[nope]",
            ],
            "training.lora.target_modules: ['nope']",
            marks=pytest.mark.slow,  # starts the workers
        ),
    ],
    ids=["no-rendezvous", "unsupported-combination", "worker-error"],
)
def test_launch_errors_are_one_line(workdir, tmp_path, sets, line):
    args = [a for s in sets for a in ("--set", s)]
    proc = cli(workdir / "lora.yaml", "-o", tmp_path / "r", *args, check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(line), lines


@pytest.mark.slow
def test_started_by_torchrun_the_workers_join(workdir, single):
    run = workdir / "own-torchrun"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-port",
            str(free_port()),
            "-m",
            "tuneplex",
            "train",
            str(workdir / "lora.yaml"),
            "-o",
            str(run),
            "--set",
            "parallelism.num_gpus_per_node=2",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("automodel: ") == 1  # rank 0 only
    assert_same_run(single["lora"], run)


@pytest.mark.slow
@pytest.mark.parametrize("procs", [1, 2], ids=["one", "dp2"])
def test_compiled_layers_train_as_eager_ones(workdir, single, procs):
    """`training.compile: true` (each decoder layer through torch.compile; inductor on a CPU), in
    one process and under FSDP2: the eager one-process run, again; the first step says how
    long it spent compiling, apart from the steady state."""
    from tuneplex.runs import read_metrics

    run = workdir / f"compiled-p{procs}"
    proc = cli(
        workdir / "all_weights.yaml", "-o", run, *layout(procs), "--set", "training.compile=true"
    )
    assert "fp32, compiled" in proc.stdout
    assert_same_run(single["all_weights"], run)
    assert_same_final(single["all_weights"], run)
    train = [e for e in read_metrics(run) if e["split"] == "train"]
    assert 0 < train[0]["compile_s"] <= train[0]["elapsed_s"]
    assert "compile_s" not in train[-1]  # shapes settle: no compiling in the last step
