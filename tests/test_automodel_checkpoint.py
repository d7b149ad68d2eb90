"""Automodel checkpoints in DCP's sharded format, on CPU: what a checkpoint holds, checkpoints
of the old (gathered safetensors) format resumed, a checkpoint of another model refused."""

from __future__ import annotations

import base64
import json
import shutil

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from helpers import chat_job_factory, train  # noqa: E402
from tuneplex.runs import mark_complete, read_metrics  # noqa: E402

JOB = """\
model: {model}
dataset: {{training: {train}, validation: {val}}}
training: {{max_seq_length: 128, precision: fp32}}
schedule: {{epochs: 3, seed: 7}}
batch: {{global_batch_size: 4, micro_batch_size: 2}}
optimizer: {{learning_rate: 1.0e-2, warmup_steps: 2}}
output: {{checkpoint_steps: 3}}
"""


@pytest.fixture
def job(tmp_path, tiny_model):
    return chat_job_factory(tmp_path, JOB, model=tiny_model)


def _same_losses(a, b) -> None:
    ea, eb = read_metrics(a), read_metrics(b)
    assert [(e["step"], e["split"]) for e in ea] == [(e["step"], e["split"]) for e in eb]
    assert [e["loss"] for e in ea] == [e["loss"] for e in eb]  # bit-equal on CPU fp32


def _dcp_tensors(path, prefix: str) -> dict:
    """Every tensor of a DCP checkpoint directory whose key starts with `prefix`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    reader = FileSystemReader(str(path / "dcp"))
    meta = reader.read_metadata().state_dict_metadata
    out = {
        k: torch.empty(m.size, dtype=m.properties.dtype)
        for k, m in meta.items()
        if k.startswith(prefix) and hasattr(m, "size")
    }
    dcp.load(out, storage_reader=reader, no_dist=True)
    return out


def _as_old_format(path) -> None:
    """Rewrite a (one-group, LoRA) checkpoint as the gathered format tuneplex wrote before the
    sharded one: model/optimizer/rng.safetensors and the RNG in trainer_state.json."""
    from safetensors.torch import save_file

    model = {k[len("model.") :]: t for k, t in _dcp_tensors(path, "model.").items()}
    moments = {}
    for key, t in _dcp_tensors(path, "optim.state.").items():
        fqn, name = key[len("optim.state.") :].rsplit(".", 1)
        moments[f"{fqn}::{name}"] = t
    rng = json.loads((path / "rng_0.json").read_text())
    cpu = torch.frombuffer(bytearray(base64.b64decode(rng["torch_cpu"])), dtype=torch.uint8)
    state = json.loads((path / "trainer_state.json").read_text())
    for key in ("format", "layout"):
        state.pop(key)
    (group,) = state["param_groups"]
    state["param_groups"] = [{**group, "params": sorted(model)}]
    state.update(aliases={}, python_rng=rng["python"], numpy_rng=rng["numpy"])
    shutil.rmtree(path / "dcp")
    for name in ("rng_0.json", "tuneplex_complete.json"):
        (path / name).unlink()
    save_file(model, str(path / "model.safetensors"))
    save_file(moments, str(path / "optimizer.safetensors"))
    save_file({"cpu": cpu}, str(path / "rng.safetensors"))
    (path / "trainer_state.json").write_text(json.dumps(state))
    mark_complete(path, step=state["step"])


def test_a_checkpoint_holds_each_ranks_shards_and_its_layout(capsys, job, tmp_path):
    run = tmp_path / "run"
    code, _, err = train(capsys, job("training: {finetuning_type: all_weights}"), "-o", run)
    assert code == 0, err
    step = run / "checkpoints" / "step_3"
    assert sorted(p.name for p in step.iterdir()) == [
        "dcp",
        "rng_0.json",
        "trainer_state.json",
        "tuneplex_complete.json",
    ]
    assert sorted(p.name for p in (step / "dcp").iterdir()) == [".metadata", "__0_0.distcp"]
    listed = json.loads((step / "tuneplex_complete.json").read_text())["files"]
    assert set(listed) >= {"dcp/.metadata", "dcp/__0_0.distcp", "rng_0.json"}
    state = json.loads((step / "trainer_state.json").read_text())
    assert state["format"] == 2 and state["layout"]["processes"] == 1
    names = set(_dcp_tensors(step, "model."))
    assert "model.lm_head.weight" in names or "model.model.embed_tokens.weight" in names


def test_an_old_format_checkpoint_resumes_with_the_same_losses(capsys, job, tmp_path):
    whole, old = tmp_path / "whole", tmp_path / "old"
    code, _, err = train(capsys, job(), "-o", whole)
    assert code == 0, err
    shutil.copytree(whole, old)
    shutil.rmtree(old / "final")
    (old / "summary.json").unlink()
    for later in ("step_6", "step_9", "step_12"):
        shutil.rmtree(old / "checkpoints" / later, ignore_errors=True)
    _as_old_format(old / "checkpoints" / "step_3")
    code, out, err = train(capsys, job(), "-o", old, "--resume")
    assert code == 0, err
    assert "resuming from" in out and "step_3" in out
    _same_losses(whole, old)
    assert (old / "checkpoints" / "step_6" / "dcp" / ".metadata").is_file()  # the new format


def test_a_checkpoint_that_does_not_fit_the_model_is_refused_in_one_line(capsys, job, tmp_path):
    """The job check refuses another model or LoRA rank first; this is the checkpoint's own
    check, by names and shapes from DCP's metadata, before anything is read."""
    from tuneplex.errors import UsageError
    from tuneplex_automodel.checkpoint import check_fits, read_metadata

    run = tmp_path / "run"
    code, _, err = train(capsys, job("schedule: {epochs: 1}"), "-o", run)
    assert code == 0, err
    path = run / "checkpoints" / "step_3"
    name = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
    meta = read_metadata(path)
    check_fits(path, metadata=meta, model_state={name: torch.zeros(16, 64)}, partial=True)
    for state, why in [
        ({name: torch.zeros(4, 64)}, f"shapes differ: {name} [16, 64] vs [4, 64]"),
        ({"other.weight": torch.zeros(1)}, "missing ['other.weight']"),
    ]:
        with pytest.raises(UsageError) as caught:
            check_fits(path, metadata=meta, model_state=state, partial=True)
        assert f"checkpoint does not fit this model ({why}" in str(caught.value)
        assert "\n" not in str(caught.value)
