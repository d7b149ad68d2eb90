"""Every model family of `parallel.plans.FAMILIES` trains, and its tensor-parallel plan is right.

A tiny model of each dense family (Llama: test_automodel_distributed.py) is built from its
transformers config class and trained through `tuneplex train` on CPU:
- in one process, LoRA and full weights: `final/` loads with transformers (and peft) and gives
  the run's last validation loss again;
- with tensor parallelism over 2 processes (and, for Qwen3's replicated q/k norms and Phi-3's
  fused projections, data × tensor parallelism over 4): the same losses and final weights as
  the one-process run;
- an architecture without a plan trains with data parallelism, and asking it for tensor
  parallelism is refused in one line.
The quick tier checks the plans as data: every module path names a real module of a freshly
built model of the family, with and without LoRA.
"""

from __future__ import annotations

import math
from dataclasses import fields

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from helpers import (  # noqa: E402
    assert_same_final,
    assert_same_run,
    build_family,
    cli,
    cli_together,
    layout,
    load_final,
    parallel_job,
)
from tuneplex.nn.models import adapter_names, unwrap_peft  # noqa: E402
from tuneplex.runs import read_metrics  # noqa: E402
from tuneplex.testing import assert_run_directory, reference_val_loss  # noqa: E402
from tuneplex_automodel.parallel import plans  # noqa: E402
from tuneplex_automodel.parallel.parallelize import decoder_layers  # noqa: E402

FAMILIES = {  # test id -> class; each trained for real (Llama in test_automodel_distributed.py)
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "granite": "GraniteForCausalLM",
}
MOE = ("Qwen3MoeForCausalLM", "MixtralForCausalLM")  # test_automodel_context_expert.py
NO_PLAN = "StableLmForCausalLM"  # an architecture the plans leave out
FTS = ("lora", "all_weights")
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
"""One-process runs use one thread, like each worker of a parallel run: two CPU threads on a
busy 2-core machine are several times slower than one."""


# --- the plans as data (quick) ---------------------------------------------------------------


@pytest.fixture(scope="module")
def tok(tokenizers):
    return tokenizers["chatml"][1]


@pytest.mark.parametrize("cls", sorted(plans.FAMILIES))
def test_plan_names_real_modules(cls, tok):
    """Each path of the family's plan is a module of the decoder layers (a path that names
    nothing would leave that module whole on every rank, silently)."""
    from torch import nn
    from tuneplex_automodel.model import apply_lora

    family = plans.FAMILIES[cls]
    model = build_family(cls, tok)
    layers = decoder_layers(model)
    assert len(layers) == 2
    for layer in layers:
        for path in family.tp:
            assert isinstance(layer.get_submodule(path), nn.Linear), path
        for path in family.partial_grads:
            assert list(layer.get_submodule(path).parameters()), path
    # A module with weights between a column split and its row split sees this rank's heads
    # (or features) only: its gradient is partial, and must be listed.
    split = {path.split(".")[0] for path, style in family.tp.items() if style == "colwise"}
    inside = {
        name
        for name, mod in layers[0].named_modules()
        if name.split(".")[0] in split
        and list(mod.parameters(recurse=False))
        and not any(name == p or name.startswith(p + ".") for p in family.tp)
    }
    assert inside == set(family.partial_grads), inside
    for attr in family.divides:
        assert isinstance(getattr(model.config, attr, None), int), attr
    if family.stages is not None:  # module paths, then config attributes (scalings)
        parts = {f.name: getattr(family.stages, f.name) for f in fields(family.stages)}
        for name in ("embed", "layers", "rotary", "norm", "head"):
            model.get_submodule(parts.pop(name))
        for attr in filter(None, parts.values()):
            assert getattr(model.config, attr) != 1, attr

    lora = apply_lora(model, rank=4, alpha=8, target_modules=None)
    plan = plans.lora_plan(family.tp, adapter_names(lora))
    assert len(plan) == 2 * len(family.tp)  # base layer, and A or B of the one adapter
    for layer in decoder_layers(lora):
        names = {n for n, _ in layer.named_modules()}
        assert set(plan) <= names, sorted(set(plan) - names)
        assert all(isinstance(layer.get_submodule(path), nn.Linear) for path in plan)
        for path in family.partial_grads:
            layer.get_submodule(path)


def test_every_dense_family_is_trained_here():
    assert plans.family_of(NO_PLAN) is None
    elsewhere = {"LlamaForCausalLM", *MOE}
    assert set(plans.FAMILIES) == set(FAMILIES.values()) | elsewhere


# --- training for real (slow) ----------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tok, tmp_path_factory) -> dict[str, str]:
    """Each family's tiny model (fp32 safetensors, fixed seed) with the tokenizer: {class: path}."""
    root = tmp_path_factory.mktemp("families")
    paths = {}
    for cls in [*FAMILIES.values(), NO_PLAN]:
        build_family(cls, tok).save_pretrained(root / cls, safe_serialization=True)
        tok.save_pretrained(root / cls)
        paths[cls] = str(root / cls)
    return paths


class Runs:
    """The runs of this module, each made once, when a test first needs it."""

    def __init__(self, root, models):
        self.root, self.models = root, models
        self.made: dict = {}  # run -> whether it was made as it should be

    def job(self, cls: str, ft: str):
        """The job file of `cls` and `ft` (`helpers.PARALLEL_JOB`: 4 steps, validation before
        and after)."""
        work = self.root / cls
        if not work.exists():
            work.mkdir()
            for kind in FTS:
                parallel_job(work, kind, model=self.models[cls], ft=kind)
        return work / f"{ft}.yaml"

    def get(self, cls: str, fts=FTS, *, procs: int = 1, tp: int = 1) -> dict:
        """{ft: run} of `cls` on `procs` processes (`tp` of them tensor-parallel); those not
        made yet are made together."""
        runs = {ft: self.root / cls / f"p{procs}-tp{tp}-{ft}" for ft in fts}
        failed = [str(run) for run in runs.values() if self.made.get(run) is False]
        if failed:
            pytest.fail(f"failed in an earlier test: {', '.join(failed)}")
        todo = [ft for ft in fts if runs[ft] not in self.made]
        self.made.update((runs[ft], False) for ft in todo)
        sets = layout(procs, tensor_parallel_size=tp) if procs > 1 else []
        outs = cli_together(
            *[[self.job(cls, ft), "-o", runs[ft], *sets] for ft in todo],
            env=ONE_THREAD if procs == 1 else None,
        )
        tps = f" × tp {tp}" if tp > 1 else ""
        shown = f"%) on {procs} processes (dp {procs // tp}{tps})" if procs > 1 else "%)"
        for ft, out in zip(todo, outs, strict=True):
            assert f"({cls}, " in out and f"{shown} on cpu" in out, out
            assert_run_directory(runs[ft])
            self.made[runs[ft]] = True
        return runs


@pytest.fixture(scope="module")
def runs(models, tmp_path_factory) -> Runs:
    return Runs(tmp_path_factory.mktemp("family-runs"), models)


@pytest.mark.slow
@pytest.mark.parametrize("ft", FTS)
@pytest.mark.parametrize("cls", list(FAMILIES.values()), ids=list(FAMILIES))
def test_one_process_final_gives_the_last_validation_loss(runs, cls, ft):
    run = runs.get(cls)[ft]
    val = [e["loss"] for e in read_metrics(run) if e["split"] == "val"]
    assert len(val) >= 2 and val[-1] < val[0], val  # it learned
    model = load_final(run, ft)
    base = unwrap_peft(model)
    assert type(base).__name__ == cls
    tied = base.get_output_embeddings().weight is base.get_input_embeddings().weight
    assert tied == base.config.tie_word_embeddings == cls.startswith("Gemma")
    mine = reference_val_loss(model, run, "automodel")
    assert math.isclose(mine, val[-1], rel_tol=1e-4), (mine, val[-1])


@pytest.mark.slow
@pytest.mark.parametrize("ft", FTS)
@pytest.mark.parametrize("cls", list(FAMILIES.values()), ids=list(FAMILIES))
def test_tensor_parallel_equals_one_process(runs, cls, ft):
    single, run = runs.get(cls)[ft], runs.get(cls, procs=2, tp=2)[ft]
    assert_same_run(single, run)
    assert_same_final(single, run)


@pytest.mark.slow
@pytest.mark.parametrize("cls", ["Qwen3ForCausalLM", "Phi3ForCausalLM"], ids=["qwen3", "phi3"])
def test_data_and_tensor_parallel_equal_one_process(runs, cls):
    """Qwen3's q/k norms are whole on every rank, their gradients partial; Phi-3 splits fused
    projections. Both sharded over 2 data-parallel ranks by FSDP on top."""
    single = runs.get(cls)["all_weights"]
    run = runs.get(cls, ["all_weights"], procs=4, tp=2)["all_weights"]
    assert_same_run(single, run)
    assert_same_final(single, run)


@pytest.mark.slow
def test_without_a_plan_data_parallel_equals_one_process(runs):
    single = runs.get(NO_PLAN, ["all_weights"])["all_weights"]
    run = runs.get(NO_PLAN, ["all_weights"], procs=2)["all_weights"]
    assert_same_run(single, run)
    assert_same_final(single, run)


@pytest.mark.slow  # starts the workers: the model's class is known once it is loaded
def test_without_a_plan_tensor_parallel_is_refused_in_one_line(runs, tmp_path):
    job = runs.job(NO_PLAN, "all_weights")
    proc = cli(job, "-o", tmp_path / "r", *layout(2, tensor_parallel_size=2), check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [
        f"parallelism.tensor_parallel_size: 2: {NO_PLAN} has no tensor-parallel plan; supported: "
        f"{', '.join(plans.supported())} (data, context and expert parallelism need none)"
    ]
