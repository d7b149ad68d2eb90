"""Pipeline parallelism on CPU (gloo, 2-4 worker processes) equals one process.

A 4-layer tiny Llama split into 2 stages, alone and with data or tensor parallelism on the
other mesh dimensions, through `tuneplex train` itself; compared with the one-process run of
the same job: every train and validation loss, gradient norm and the final/ weights.
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
    gloo_group,
    layout,
    load_final,
    parallel_job,
    reference_runs,
)
from tuneplex.errors import UsageError  # noqa: E402
from tuneplex.testing import assert_run_directory  # noqa: E402
from tuneplex_automodel.parallel import plans  # noqa: E402


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tokenizers):
    from tuneplex.testing.tiny import build_llama

    root = tmp_path_factory.mktemp("pipeline")
    model = root / "llama-4l"
    build_llama(model, tokenizer=tokenizers["chatml"][1], hidden=64, layers=4, init_std=0.1)
    for ft in ("lora", "all_weights"):
        parallel_job(root, ft, model=model, ft=ft)
    return root


@pytest.fixture(scope="module")
def single(workdir):
    """The one-process reference run of each finetuning type."""
    return reference_runs(workdir)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("ft", "procs", "tp", "micro", "shown"),
    [
        ("lora", 2, 1, 1, "2 processes (dp 1 × pp 2)"),
        ("all_weights", 2, 1, 1, "2 processes (dp 1 × pp 2)"),
        ("all_weights", 2, 1, 4, "2 processes (dp 1 × pp 2)"),  # 1 micro-batch: GPipe
        ("all_weights", 4, 1, 1, "4 processes (dp 2 × pp 2)"),
        ("lora", 4, 2, 1, "4 processes (dp 1 × tp 2 × pp 2)"),
    ],
    ids=["pp2-lora", "pp2-full", "pp2-gpipe", "dp2xpp2-full", "tp2xpp2-lora"],
)
def test_pipeline_equals_one_process(workdir, single, ft, procs, tp, micro, shown):
    run = workdir / f"pp2-p{procs}-tp{tp}-m{micro}-{ft}"
    sizes = {"pipeline_parallel_size": 2, "tensor_parallel_size": tp}
    extra = ["--set", f"batch.micro_batch_size={micro}"]
    proc = cli(workdir / f"{ft}.yaml", "-o", run, *layout(procs, **sizes), *extra)
    assert shown in proc.stdout
    assert_run_directory(run)
    assert_same_run(single[ft], run)
    assert_same_final(single[ft], run)
    final = load_final(run, ft)
    if ft == "all_weights":
        assert len(final.model.layers) == 4


@pytest.mark.slow
def test_pipeline_resumes_from_a_merged_checkpoint(workdir, single):
    """Rank 0 writes one checkpoint for both stages; each stage reads back its own part."""
    run = workdir / "pp2-resumed"
    args = layout(2, pipeline_parallel_size=2)
    cli(workdir / "all_weights.yaml", "-o", run, *args)
    shutil.rmtree(run / "checkpoints" / "step_4")
    shutil.rmtree(run / "final")
    cli(workdir / "all_weights.yaml", "-o", run, "--resume", *args)
    assert_same_run(single["all_weights"], run)
    assert_same_final(single["all_weights"], run)


def test_stage_split():
    from tuneplex_automodel.parallel.pp import stage_layers

    assert stage_layers(4, 2) == [range(0, 2), range(2, 4)]
    assert stage_layers(7, 3) == [range(0, 3), range(3, 5), range(5, 7)]
    assert [len(r) for r in stage_layers(16, 4)] == [4, 4, 4, 4]


def test_unsplittable_models_are_refused():
    from transformers import LlamaConfig, LlamaForCausalLM
    from tuneplex_automodel.parallel.pp import check_splittable

    small = dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, vocab_size=64)
    tied = LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, tie_word_embeddings=True, **small))
    with pytest.raises(UsageError) as err:
        check_splittable(tied, stages=2)
    assert [str(p) for p in err.value.problems] == [
        "parallelism.pipeline_parallel_size: 2: LlamaForCausalLM ties its output head to its "
        "input embeddings, which would live on different stages; set it to 1"
    ]
    shallow = LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, **small))
    with pytest.raises(UsageError) as err:
        check_splittable(shallow, stages=4)
    assert [str(p) for p in err.value.problems] == [
        "parallelism.pipeline_parallel_size: 4 stages for a model of 2 decoder layers"
    ]


@pytest.mark.parametrize("cls", plans.supported(pipeline=True))
def test_a_stage_computes_what_the_model_computes(cls, tokenizers):
    """A stage holding every layer gives the model's own logits on a packed row and a padded
    one: the family's parts (`plans.StageParts`) and scalings (Granite's multipliers) are the
    ones its forward uses. Mistral's sliding window (4) is shorter than the samples: the stage
    builds its own mask, and the window must survive that."""
    from helpers import build_family
    from tuneplex.data.collate import collate
    from tuneplex_automodel.parallel.dims import ParallelDims
    from tuneplex_automodel.parallel.mesh import Dist
    from tuneplex_automodel.parallel.pp import keep_stage

    with gloo_group():
        model = build_family(cls, tokenizers["chatml"][1]).eval()
        config = model.config
        packed = {"input_ids": list(range(1, 14)), "position_ids": [*range(7), *range(6)]}
        rows = [packed, {"input_ids": list(range(20, 29))}]
        batch = collate([{**r, "labels": r["input_ids"]} for r in rows], pad_id=0)
        ids, pos = batch["input_ids"], batch["position_ids"]
        with torch.no_grad():
            want = model(input_ids=ids, position_ids=pos, use_cache=False).logits
            window = getattr(config, "sliding_window", None)
            config.sliding_window = None
            unwindowed = model(input_ids=ids, position_ids=pos, use_cache=False).logits
            config.sliding_window = window
            dims = ParallelDims(
                num_nodes=1, gpus_per_node=1, tp=1, pp=1, cp=1, ep=1,
                global_batch_size=1, micro_batch_size=1,
            )  # fmt: skip
            one = Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), dims=dims)
            got = keep_stage(model, dist=one, parts=plans.FAMILIES[cls].stages)(ids, pos)
        if cls == "MistralForCausalLM":
            assert not torch.allclose(unwindowed, want, atol=1e-3)  # the window matters here
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
