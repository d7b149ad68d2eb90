"""The optimizer, schedule and regularisation settings of the automodel backend (issue 30: the v1
hyperparameter object and the tuning guide): each changes what a real tiny run does.

- `optimizer.lr_schedule` / `min_learning_rate`: the rate each step took (metrics.jsonl) and
  the optimizer's last rate (the checkpoint) follow the schedule;
- `optimizer.name` adam / adamw and the adam betas: two steps of a real run equal
  torch.optim.Adam's / AdamW's own steps on the same gradients, and differ from each other;
- `training.lora.dropout`, `use_dora`, `hidden_dropout`, `attention_dropout`: the training loss
  or the adapter changes against the same run without them, evaluation (dropout off) does not;
- every model family takes the dropout overrides.
"""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from helpers import build_family, chat_rows, losses, merge_yaml, train, write_rows  # noqa: E402
from tuneplex.runs import read_metrics  # noqa: E402
from tuneplex.testing import reference_val_loss  # noqa: E402
from tuneplex_automodel.plan import learning_rate  # noqa: E402

BASE = """\
dataset: {{training: {train}, validation: {val}}}
training: {{max_seq_length: 128, precision: fp32}}
schedule: {{epochs: 1, seed: 7}}
batch: {{global_batch_size: 4, micro_batch_size: 2}}
optimizer: {{learning_rate: 1.0e-2, warmup_steps: 1}}
"""


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("hp-data")
    train_path, val_path = root / "train.jsonl", root / "val.jsonl"
    write_rows(train_path, chat_rows(16))
    write_rows(val_path, chat_rows(6, seed=1))
    return train_path, val_path


def job_text(model: str, files, extra: str = "") -> str:
    text = f"model: {model}\n" + BASE.format(train=files[0], val=files[1])
    return merge_yaml(text, extra)


@pytest.fixture
def run_job(capsys, tmp_path, tiny_model, files):
    """run_job(extra, name) -> the run directory of `tuneplex train` on the tiny Llama (LoRA,
    4 steps of 4 rows, validation before and after)."""

    def _run(extra: str = "", name: str = "run"):
        path = tmp_path / f"{name}.yaml"
        path.write_text(job_text(tiny_model, files, extra))
        code, _, err = train(capsys, path, "-o", tmp_path / name)
        assert code == 0, err
        return tmp_path / name

    return _run


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory, tiny_model, files):
    """The run the regularisation tests compare with: the same job without their setting."""
    from tuneplex.cli import main

    root = tmp_path_factory.mktemp("plain")
    path = root / "job.yaml"
    path.write_text(job_text(tiny_model, files))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TUNEPLEX_CACHE", str(root / "cache"))
        assert main(["train", str(path), "-o", str(root / "run")]) == 0
    return root / "run"


def train_lrs(run) -> list[float]:
    return [e["lr"] for e in read_metrics(run) if e["split"] == "train"]


def last_param_groups(run) -> list[dict]:
    state = sorted((run / "checkpoints").glob("step_*/trainer_state.json"))[-1]
    return json.loads(state.read_text())["param_groups"]


# -- schedule --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ("{lr_schedule: cosine, min_learning_rate: 2.0e-3}", [0.01, 0.01, 0.006, 0.002]),
        ("{lr_schedule: flat}", [0.01, 0.01, 0.01, 0.01]),
    ],
    ids=["cosine-to-min", "flat"],
)
def test_the_schedule_sets_the_rate_of_every_step(run_job, settings, expected):
    run = run_job(f"optimizer: {settings}")
    assert train_lrs(run) == pytest.approx(expected, rel=1e-9)
    assert all(g["lr"] == pytest.approx(expected[-1]) for g in last_param_groups(run))


def test_min_learning_rate_default_is_a_tenth_and_linear_decays_straight():
    kw = dict(peak=1.0, warmup_steps=0, total_steps=5)
    assert learning_rate(4, **kw) == pytest.approx(0.1)
    assert [learning_rate(s, **kw, schedule="linear", min_lr=0.2) for s in range(5)] == (
        pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2])
    )
    assert [learning_rate(s, **kw, schedule="flat") for s in range(5)] == [1.0] * 5
    assert learning_rate(4, **kw, min_lr=0.0) == 0.0


# -- optimizer -------------------------------------------------------------------------------
FULL_STEPS = """\
training: {finetuning_type: all_weights}
schedule: {epochs: 2}
batch: {global_batch_size: 16, micro_batch_size: 8}
optimizer: {name: NAME, learning_rate: 1.0e-3, warmup_steps: 0, lr_schedule: flat,
  weight_decay: 0.5, adam_beta1: 0.8, adam_beta2: 0.95, max_grad_norm: 1.0e+6}
"""


def reference_steps(model_dir: str, run, *, kind, steps: int) -> dict:
    """`steps` steps of torch.optim's `kind` over every training row (one step each, as the job
    plans), decay on ≥ 2-D parameters only, gradients of the mean token loss computed here row
    by row: the weights the run should end with."""
    from transformers import AutoModelForCausalLM
    from tuneplex.data.pipeline import prepare
    from tuneplex.plugins import registry

    b = registry().backends["automodel"].backend
    job = b.job_schema.model_validate(json.loads((run / "job.json").read_text()))
    rows = prepare(b.data_spec(job)).train.examples
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).train()
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.5},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    opt = kind(groups, lr=1e-3, betas=(0.8, 0.95), eps=1e-8)
    for _ in range(steps):
        total, count = 0.0, 0
        for row in rows:
            ids = torch.tensor([row["input_ids"]])
            labels = torch.tensor(row["labels"])
            logits = model(input_ids=ids).logits[0]
            keep = labels[1:] != -100
            total = total + torch.nn.functional.cross_entropy(
                logits[:-1][keep], labels[1:][keep], reduction="sum"
            )
            count += int(keep.sum())
        opt.zero_grad()
        (total / count).backward()
        opt.step()
    return {k: v.detach() for k, v in model.state_dict().items()}


def test_adam_and_adamw_each_take_torch_optims_own_steps(run_job, tiny_model):
    from helpers import final_weights

    runs = {
        name: run_job(FULL_STEPS.replace("NAME", name), name=name) for name in ("adam", "adamw")
    }
    kinds = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
    finals = {}
    for name, run in runs.items():
        groups = last_param_groups(run)
        assert all(g["betas"] == [0.8, 0.95] for g in groups)  # the betas reached the optimizer
        assert {g["decoupled_weight_decay"] for g in groups} == {name == "adamw"}
        expected = reference_steps(tiny_model, run, kind=kinds[name], steps=2)
        finals[name] = final_weights(run)
        for key, got in finals[name].items():
            torch.testing.assert_close(got, expected[key], atol=2e-6, rtol=0, msg=key)
    moved = max((finals["adam"][k] - finals["adamw"][k]).abs().max().item() for k in finals["adam"])
    assert moved > 1e-4  # L2 decay through Adam's normalisation is not decoupled decay


# -- regularisation --------------------------------------------------------------------------
def val_losses(run) -> list[float]:
    return losses(run, "val")


def test_lora_dropout_changes_the_trained_adapter(run_job, plain_run):
    from helpers import final_weights

    run = run_job("training: {lora: {dropout: 0.3}}")
    assert json.loads((run / "final" / "adapter_config.json").read_text())["lora_dropout"] == 0.3
    assert val_losses(run)[0] == val_losses(plain_run)[0]
    a, b = losses(run), losses(plain_run)
    assert a[0] == pytest.approx(b[0], abs=1e-6)  # lora_B starts at 0: nothing to drop yet
    assert all(abs(x - y) > 1e-4 for x, y in zip(a[1:], b[1:], strict=True))
    x, y = final_weights(run), final_weights(plain_run)
    assert x.keys() == y.keys()
    assert max((x[k] - y[k]).abs().max().item() for k in x) > 1e-4


@pytest.mark.parametrize("key", ["hidden_dropout", "attention_dropout"])
def test_dropout_changes_training_losses_but_not_evaluation(run_job, plain_run, key):
    run = run_job(f"training: {{{key}: 0.2}}")
    assert val_losses(run)[0] == val_losses(plain_run)[0]  # eval mode: no dropout
    a, b = losses(run), losses(plain_run)
    assert all(abs(x - y) > 1e-4 for x, y in zip(a, b, strict=True)), (a, b)


def test_dora_trains_magnitudes_and_merges_as_peft_does(run_job, tiny_model):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    run = run_job("training: {finetuning_type: lora_merged, lora: {use_dora: true}}")
    adapter = run / "final" / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["use_dora"] is True
    tensors = load_file(adapter / "adapter_model.safetensors")
    magnitudes = {k: v for k, v in tensors.items() if k.endswith(".lora_magnitude_vector")}
    assert len(magnitudes) == 2 * 7  # every linear layer of both decoder layers
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    name = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"
    start = base.model.layers[0].self_attn.q_proj.weight.norm(dim=1)  # DoRA's initial m
    assert (magnitudes[name] - start).abs().max() > 1e-4  # it trained
    merged = AutoModelForCausalLM.from_pretrained(run / "final").eval()
    adapted = PeftModel.from_pretrained(base, adapter).eval()
    ids = torch.randint(0, merged.config.vocab_size, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(
            merged(input_ids=ids).logits, adapted(input_ids=ids).logits, atol=2e-5, rtol=0
        )
    summary = json.loads((run / "summary.json").read_text())
    assert reference_val_loss(adapted, run, "automodel") == pytest.approx(
        summary["val_loss"], abs=1e-4
    )


@pytest.mark.parametrize(
    "cls",
    [
        "LlamaForCausalLM",
        "Qwen3ForCausalLM",
        "Gemma2ForCausalLM",
        "Phi3ForCausalLM",
        "MixtralForCausalLM",
    ],
)
def test_every_family_takes_the_dropout_overrides(cls, tokenizers, tmp_path):
    """Training-mode logits change, eval-mode logits do not, and the config written to final/
    keeps the checkpoint's values (Phi-3 drops out its residual contributions itself:
    `resid_pdrop`; the others through hooks)."""
    from tuneplex_automodel.model import RESIDUAL_DROPOUT, load_model

    build_family(cls, tokenizers["chatml"][1]).save_pretrained(tmp_path)
    kw = dict(dtype=torch.float32, device=torch.device("cpu"), trust_remote_code=False)
    plain, _ = load_model(str(tmp_path), **kw)
    ids = torch.randint(3, plain.config.vocab_size, (2, 16))
    for setting in ({"hidden_dropout": 0.3}, {"attention_dropout": 0.3}):
        model, _ = load_model(str(tmp_path), **kw, **setting)
        with torch.no_grad():
            same = model.eval()(input_ids=ids).logits
            torch.testing.assert_close(same, plain.eval()(input_ids=ids).logits)
            torch.manual_seed(0)
            dropped = model.train()(input_ids=ids).logits
        assert (dropped - same).abs().max() > 1e-3, setting
        assert model.config.to_dict() == plain.config.to_dict()
    phi3 = hasattr(plain.config, RESIDUAL_DROPOUT)
    assert phi3 == (cls == "Phi3ForCausalLM")
