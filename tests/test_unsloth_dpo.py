"""Preference tuning (DPO, ORPO, SimPO) on the unsloth backend: the schema's rules, the settings
TRL's DPOTrainer, ORPOTrainer and CPOTrainer receive, the pairs they are fed, and whole runs
through `tuneplex train` on CPU with transformers + peft standing in for unsloth (the real
path: tests/gpu/test_gpu_unsloth.py, tests/gpu/test_gpu_unsloth_preference.py)."""

from __future__ import annotations

import json
import math

import pytest
from helpers import preference_rows, write_rows
from tuneplex.errors import UsageError
from tuneplex.schema.loading import validate_job
from tuneplex_unsloth.schema import UnslothJobInput, trl_loss_type

MINIMAL = {"model": {"name": "org/base"}, "dataset": {"path": "pairs.jsonl"}}


def job(training=None, **sections):
    data = {**MINIMAL, "training": {"training_type": "dpo", **(training or {})}}
    data.update(sections)
    return data


def problems(data) -> list[str]:
    with pytest.raises(UsageError) as info:
        validate_job(UnslothJobInput, data)
    return info.value.lines()


# ------------------------------------------------------------------ schema


def test_dpo_settings_are_filled_for_dpo_and_refused_otherwise():
    dpo = validate_job(UnslothJobInput, job()).training.dpo
    assert (dpo.ref_policy_kl_penalty, dpo.loss_type, dpo.sft_loss_weight) == (0.05, "sigmoid", 0)
    assert validate_job(UnslothJobInput, MINIMAL).training.dpo is None
    sft = {**MINIMAL, "training": {"dpo": {"ref_policy_kl_penalty": 0.2}}}
    assert problems(sft) == ["training.dpo: only used when training_type is dpo"]
    assert validate_job(UnslothJobInput, {**MINIMAL, "training": {"dpo": {}}}).training.dpo is None
    assert problems(job({"training_type": "ppo"}))[0].startswith(
        "training.training_type: must be one of: sft, dpo, grpo (got 'ppo')"
    )


def test_packing_is_refused_with_dpo():
    assert problems(job(dataset={"path": "p.jsonl", "packing": True})) == [
        "dataset.packing: true: dpo scores each pair's chosen and rejected sides unpacked; set "
        "it to false"
    ]


@pytest.mark.parametrize(
    ("dpo", "trl"),
    [
        ({}, "sigmoid"),
        ({"label_smoothing": 0.1}, "robust"),
        ({"preference_average_log_probs": True}, "sigmoid_norm"),
        ({"loss_type": "ipo", "preference_average_log_probs": True}, "ipo"),
        ({"loss_type": "hinge"}, "hinge"),
        ({"loss_type": "orpo"}, "orpo"),
        ({"loss_type": "simpo", "sft_loss_weight": 0.3}, "simpo"),
    ],
)
def test_objectives_with_a_trl_equal(dpo, trl):
    assert trl_loss_type(validate_job(UnslothJobInput, job({"dpo": dpo})).training.dpo) == trl


@pytest.mark.parametrize(
    ("dpo", "line"),
    [
        (
            {"loss_type": "ipo"},
            "training.dpo.preference_average_log_probs: false: TRL's IPO compares per-token "
            "average log-probabilities; set it to true (or train with --backend automodel)",
        ),
        (
            {"loss_type": "hinge", "preference_average_log_probs": True},
            "training.dpo.preference_average_log_probs: true: TRL's loss_type hinge compares "
            "summed log-probabilities; set it to false (or train with --backend automodel)",
        ),
        (
            {"label_smoothing": 0.1, "preference_average_log_probs": True},
            "training.dpo.preference_average_log_probs: true: TRL's label_smoothing compares "
            "summed log-probabilities; set it to false (or train with --backend automodel)",
        ),
        (
            {"sft_loss_weight": 0.5, "sft_average_log_probs": True},
            "training.dpo.sft_average_log_probs: true: TRL's SFT term is the mean over the "
            "batch's chosen tokens; set it to false (or train with --backend automodel)",
        ),
        (
            {"loss_type": "kto_pair"},
            "training.dpo.loss_type: kto_pair: no TRL trainer computes KTO on pairs "
            "(DPOTrainer dropped it, KTOTrainer takes unpaired rows); train it with "
            "--backend automodel",
        ),
        (
            {"loss_type": "orpo", "preference_loss_weight": 0.5},
            "training.dpo.preference_loss_weight: 0.5: TRL's ORPOTrainer has no weight for "
            "its loss; set it to 1 (or train with --backend automodel)",
        ),
        (
            {"loss_type": "simpo", "preference_loss_weight": 2.0},
            "training.dpo.preference_loss_weight: 2: TRL's CPOTrainer has no weight for its "
            "loss; set it to 1 (or train with --backend automodel)",
        ),
    ],
)
def test_objectives_without_a_trl_equal_are_refused_in_one_line(dpo, line):
    assert problems(job({"dpo": dpo})) == [line]


@pytest.mark.parametrize(
    ("dpo", "line"),
    [
        (
            {"loss_type": "simpo", "preference_average_log_probs": False},
            "training.dpo.preference_average_log_probs: false: simpo compares per-token average "
            "log-probabilities by definition; set it to true or leave it out",
        ),
        (
            {"loss_type": "orpo", "sft_loss_weight": 0.5},
            "training.dpo.sft_loss_weight: 0.5: orpo's loss holds the chosen responses' NLL "
            "already (ref_policy_kl_penalty weighs its odds-ratio term against it); set it to 0",
        ),
        (
            {"simpo_gamma": 1.0},
            "training.dpo.simpo_gamma: only used with loss_type simpo (got sigmoid)",
        ),
        (
            {"loss_type": "orpo", "label_smoothing": 0.1},
            "training.dpo.label_smoothing: only used with loss_type sigmoid (got orpo)",
        ),
        (
            {"loss_type": "simpo", "simpo_gamma": 0},
            "training.dpo.simpo_gamma: must be > 0 (got 0)",
        ),
    ],
)
def test_contradictory_preference_settings_are_refused_in_one_line(dpo, line):
    """The shared schema's rules (both backends): each a single line naming its key."""
    from tuneplex_automodel.schema import AutomodelJobInput

    assert problems(job({"dpo": dpo})) == [line]
    data = {"model": "org/base", "dataset": {"training": "p.jsonl"}}
    data["training"] = {"training_type": "dpo", "dpo": dpo}
    with pytest.raises(UsageError) as info:
        validate_job(AutomodelJobInput, data)
    assert info.value.lines() == [line]


def test_reference_free_losses_are_length_normalised_and_survive_job_json():
    """orpo and simpo compare averages: left out, preference_average_log_probs is set to true,
    and the resolved job (job.json) validates to itself."""
    for loss_type in ("orpo", "simpo"):
        parsed = validate_job(UnslothJobInput, job({"dpo": {"loss_type": loss_type}}))
        assert parsed.training.dpo.preference_average_log_probs is True
        dumped = parsed.model_dump(mode="json")
        assert validate_job(UnslothJobInput, dumped).model_dump(mode="json") == dumped
    sigmoid = validate_job(UnslothJobInput, job()).model_dump(mode="json")
    assert sigmoid["training"]["dpo"]["simpo_gamma"] == 0.5  # its default: harmless, accepted
    assert validate_job(UnslothJobInput, sigmoid).model_dump(mode="json") == sigmoid


def test_an_adapter_on_the_lm_head_is_refused_with_dpo():
    lora = {"target_modules": ["q_proj", "lm_head"]}
    assert problems(job({"lora": lora})) == [
        "training.lora.target_modules: lm_head: TRL's DPO scores with lm_head's weight "
        "directly, so an adapter there would never train; remove it"
    ]
    sft = {**MINIMAL, "training": {"lora": lora}}
    assert validate_job(UnslothJobInput, sft).training.lora.target_modules == lora["target_modules"]


# ------------------------------------------------------------------ what TRL receives


def test_dpo_config_translates_every_field(tmp_path):
    pytest.importorskip("trl")
    from tuneplex_unsloth.dpo import dpo_config
    from tuneplex_unsloth.trainer import training_args

    parsed = validate_job(
        UnslothJobInput,
        job(
            {"dpo": {"ref_policy_kl_penalty": 0.2, "label_smoothing": 0.1, "sft_loss_weight": 0.3}},
            model={"name": "org/base", "max_seq_length": 96},
            schedule={"max_steps": 30, "warmup_steps": 3, "logging_steps": 2, "seed": 9},
            batch={"per_device_train_batch_size": 4, "gradient_accumulation_steps": 8},
            optimizer={"learning_rate": 5e-6, "optim": "adamw_torch", "max_grad_norm": 0.3},
        ),
    )
    c = dpo_config(parsed, common=training_args(parsed, tmp_path, cuda=False))
    assert (c.beta, c.loss_type, c.loss_weights) == (0.2, ["robust", "sft"], [1.0, 0.3])
    assert (c.label_smoothing, c.max_length, c.max_grad_norm) == (0.1, 96, 0.3)
    assert (c.learning_rate, c.optim, c.max_steps, c.warmup_steps) == (5e-6, "adamw_torch", 30, 3)
    assert (c.per_device_train_batch_size, c.gradient_accumulation_steps) == (4, 8)
    assert (c.logging_steps, c.seed, c.use_cpu, c.bf16) == (2, 9, True, False)
    assert not c.precompute_ref_log_probs and c.model_init_kwargs is None  # LoRA: no copy
    plain = validate_job(
        UnslothJobInput,
        job({"finetuning_type": "all_weights"}, model={"name": "m", "load_in_4bit": False}),
    )
    c = dpo_config(plain, common=training_args(plain, tmp_path, cuda=False))
    assert (c.loss_type, c.loss_weights, c.label_smoothing) == (["sigmoid"], [1.0], 0.0)
    assert c.model_init_kwargs == {"dtype": "float32"}  # the frozen copy, as the policy loads


def test_orpo_and_simpo_configs_translate_every_field(tmp_path):
    pytest.importorskip("trl")
    from trl.experimental.cpo import CPOConfig
    from trl.experimental.orpo import ORPOConfig
    from tuneplex_unsloth.dpo import dpo_config, log_keys
    from tuneplex_unsloth.trainer import training_args

    def config(dpo):
        parsed = validate_job(
            UnslothJobInput,
            job(
                {"dpo": dpo},
                model={"name": "org/base", "max_seq_length": 96},
                schedule={"max_steps": 30, "seed": 9},
                optimizer={"learning_rate": 5e-6, "optim": "adamw_torch"},
            ),
        )
        c = dpo_config(parsed, common=training_args(parsed, tmp_path, cuda=False))
        assert (c.max_length, c.learning_rate, c.max_steps, c.seed) == (96, 5e-6, 30, 9)
        assert not c.disable_dropout and c.model_init_kwargs is None  # no reference copy
        return c, log_keys(parsed)

    c, keys = config({"loss_type": "orpo", "ref_policy_kl_penalty": 0.25})
    assert type(c) is ORPOConfig and c.beta == 0.25
    assert keys["sft_loss"] == "nll_loss"  # ORPO's NLL term
    c, keys = config({"loss_type": "simpo", "ref_policy_kl_penalty": 2.5, "simpo_gamma": 1.2})
    assert type(c) is CPOConfig
    assert (c.loss_type, c.beta, c.simpo_gamma, c.cpo_alpha, c.label_smoothing) == (
        "simpo",
        2.5,
        1.2,
        0.0,
        0.0,
    )
    assert "sft_loss" not in keys
    c, keys = config({"loss_type": "simpo", "sft_loss_weight": 0.4})
    assert (c.cpo_alpha, keys["sft_loss"]) == (0.4, "nll_loss")  # CPO-SimPO


def test_pairs_are_trls_tokenized_preference_batch(tmp_path, tiny_model):
    """The pipeline's interleaved sides, read as pairs and collated, give exactly the batch
    TRL's own collator builds from the same prompt and completion tokens."""
    torch = pytest.importorskip("torch")
    from trl.trainer.dpo_trainer import DataCollatorForPreference
    from tuneplex.data.pipeline import prepare
    from tuneplex.plugins import registry
    from tuneplex_unsloth.dpo import PairCollator, pair_dataset

    write_rows(tmp_path / "pairs.jsonl", preference_rows(5, seed=0))
    backend = registry().backends["unsloth"].backend
    parsed = validate_job(
        backend.job_schema,
        job(
            model={"name": tiny_model, "max_seq_length": 64},
            dataset={"path": str(tmp_path / "pairs.jsonl")},
        ),
    )
    sides = prepare(backend.data_spec(parsed)).train.dataset
    pairs = pair_dataset(sides)
    assert len(pairs) == len(sides) // 2 == 5
    assert pairs[3]["pair_input_ids"] == [sides[6]["input_ids"], sides[7]["input_ids"]]
    items = [pairs[i] for i in range(len(pairs))]
    ours = PairCollator(pad_id=0)(items)

    def split(ids, labels):
        start = next(i for i, x in enumerate(labels) if x != -100)
        return ids[:start], ids[start:]

    trl_items = []
    for p in items:
        (prompt, chosen), (prompt2, rejected) = (
            split(ids, lab) for ids, lab in zip(p["pair_input_ids"], p["pair_labels"], strict=True)
        )
        assert prompt == prompt2
        trl_items.append({"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected})
    theirs = DataCollatorForPreference(pad_token_id=0)(trl_items)
    for key in ("input_ids", "attention_mask", "completion_mask"):
        assert torch.equal(ours[key], theirs[key]), key
    assert PairCollator.tokens(items) == int(ours["attention_mask"].sum())


def test_orpo_and_cpo_score_exactly_the_core_targets(tmp_path, tiny_model):
    """SideCollator's batch, as ORPO and CPO concatenate and score it (TRL's own
    concatenated_inputs and get_batch_logps), gives each side's average log-probability over
    exactly the core's targets: the core's sequence_log_probs over its target count."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer
    from tuneplex.data.collate import RowTable, collate
    from tuneplex.data.pipeline import prepare
    from tuneplex.nn.evaluation import sequence_log_probs
    from tuneplex.plugins import registry
    from tuneplex_unsloth.dpo import SideCollator, pair_dataset

    write_rows(tmp_path / "pairs.jsonl", preference_rows(5, seed=0))
    backend = registry().backends["unsloth"].backend
    parsed = validate_job(
        backend.job_schema,
        job(
            model={"name": tiny_model, "max_seq_length": 64},
            dataset={"path": str(tmp_path / "pairs.jsonl")},
        ),
    )
    sides = prepare(backend.data_spec(parsed)).train.dataset
    pairs = pair_dataset(sides)
    items = [pairs[i] for i in range(len(pairs))]
    batch = SideCollator(pad_id=0)(items)
    assert batch["chosen_input_ids"].shape[0] == batch["rejected_labels"].shape[0] == 5
    joined = ORPOTrainer.concatenated_inputs(batch, padding_value=0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    with torch.no_grad():
        logits = model(
            joined["concatenated_input_ids"],
            attention_mask=joined["concatenated_attention_mask"],
        ).logits
        theirs = ORPOTrainer.get_batch_logps(
            logits, joined["concatenated_labels"], average_log_prob=True
        )
        rows = RowTable(sides)
        order = [2 * i for i in range(5)] + [2 * i + 1 for i in range(5)]  # chosen, rejected
        core = collate(rows.take(order), pad_id=0)
        ours = sequence_log_probs(model, core) / torch.as_tensor(
            rows.target_counts[order], dtype=torch.float32
        )
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-6)


def test_plain_lm_head_gives_the_core_log_probs(tiny_model):
    """The CPU stand-in for TRL's Triton LM head: per-row sums of its log-probabilities equal
    the core's `sequence_log_probs` (values and gradients), zero where nothing counts."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head
    from tuneplex.data.collate import collate
    from tuneplex.nn.evaluation import sequence_log_probs
    from tuneplex_unsloth.dpo import plain_lm_head

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    g = torch.Generator().manual_seed(0)
    rows = []
    for n, start in ((12, 4), (7, 2), (9, 9)):
        ids = torch.randint(3, model.config.vocab_size, (n,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * start + ids[start:]})
    batch = collate(rows, pad_id=0)
    want = sequence_log_probs(model, batch)
    (w_grad,) = torch.autograd.grad(want.sum(), [model.lm_head.weight])

    add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    plain_lm_head(model)
    mask = torch.arange(12) < torch.tensor([len(r["input_ids"]) for r in rows])[:, None]
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=mask.long(),
        labels=batch["labels"],
        fused_lm_head=True,
    )
    got = out.log_probs.sum(1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    (g_grad,) = torch.autograd.grad(got.sum(), [model.lm_head.weight])
    torch.testing.assert_close(g_grad, w_grad, rtol=1e-4, atol=1e-6)
    assert got[2].item() == 0.0 and not out.entropy[2].any() and not out.is_top1[2].any()
    assert out.log_probs.shape == out.entropy.shape == (3, 11)


# ------------------------------------------------------------------ whole runs (CPU seam)

JOB = """\
model: {{name: {model}, max_seq_length: 64, load_in_4bit: false}}
dataset: {{path: {root}/pairs.jsonl, validation_path: {root}/val-pairs.jsonl}}
training:
  training_type: dpo
  use_gradient_checkpointing: false
  dpo: {{ref_policy_kl_penalty: 0.1}}
schedule: {{epochs: {epochs}, seed: 3, eval_steps: 4}}
batch: {{per_device_train_batch_size: 2, gradient_accumulation_steps: 2}}
optimizer: {{learning_rate: 1.0e-2, optim: adamw_torch}}
"""


def swapped(rows: list[dict]) -> list[dict]:
    """The pairs with "no." preferred: the side the tiny starting model disfavours."""
    return [{**r, "chosen": r["rejected"], "rejected": r["chosen"]} for r in rows]


def dpo_run(capsys, tmp_path, tiny_model, *, epochs: int, extra: str = "", swap: bool = False):
    from helpers import merge_yaml, train

    flip = swapped if swap else list
    write_rows(tmp_path / "pairs.jsonl", flip(preference_rows(16, seed=0)))
    write_rows(tmp_path / "val-pairs.jsonl", flip(preference_rows(8, seed=1)))
    path = tmp_path / "job.yaml"
    path.write_text(merge_yaml(JOB.format(model=tiny_model, root=tmp_path, epochs=epochs), extra))
    out = tmp_path / "run"
    code, stdout, err = train(capsys, path, "--backend", "unsloth", "-o", out)
    assert code == 0, err
    return out, stdout


def events(run, split: str) -> list[dict]:
    from tuneplex.runs import read_metrics

    return [e for e in read_metrics(run) if e["split"] == split]


REWARDS = ("rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin")


@pytest.mark.slow
def test_lora_dpo_starts_at_ln2_learns_the_preference_and_saves_an_adapter(
    cpu_seam, capsys, tmp_path, tiny_model
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from tuneplex.testing import assert_run_directory

    out, stdout = dpo_run(capsys, tmp_path, tiny_model, epochs=2)
    assert_run_directory(out)
    train, val = events(out, "train"), events(out, "val")
    assert len(train) == 8  # 16 pairs, 4 per step, 2 epochs
    first = train[0]
    assert abs(first["loss"] - math.log(2)) < 1e-4, first
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margin"):
        assert abs(first[key]) < 1e-4, (key, first)
    assert all(set(REWARDS) <= set(e) for e in train + val)
    assert [e["step"] for e in val] == [0, 4, 8]
    assert abs(val[0]["loss"] - math.log(2)) < 1e-4 and val[0]["rewards/margin"] == 0
    assert val[-1]["rewards/accuracy"] > 0.5, val
    assert val[-1]["rewards/margin"] > 0 and val[-1]["loss"] < val[0]["loss"], val
    assert "16 training pairs" in stdout and "[val] step 8" in stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["training_type"] == "dpo" and summary["status"] == "completed"
    final = out / "final"
    assert not (final / "ref").exists()  # the reference is the base, not a saved adapter
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), final)
    assert model.active_adapters == ["default"]


@pytest.mark.slow
def test_full_weight_dpo_uses_a_frozen_copy(cpu_seam, capsys, tmp_path, tiny_model):
    from transformers import AutoModelForCausalLM

    extra = "training: {finetuning_type: all_weights}\nschedule: {max_steps: 2}"
    out, _ = dpo_run(capsys, tmp_path, tiny_model, epochs=1, extra=extra)
    train = events(out, "train")
    assert abs(train[0]["loss"] - math.log(2)) < 1e-4 and train[1]["rewards/margin"] != 0
    AutoModelForCausalLM.from_pretrained(out / "final")


def core_validation_loss(tmp_path, tiny_model, dpo: dict) -> float:
    """The validation loss of the starting model as tuneplex.nn.preference computes it, on the
    sides the unsloth backend's pipeline prepares from val-pairs.jsonl."""
    import torch
    from transformers import AutoModelForCausalLM
    from tuneplex.data.collate import RowTable, collate
    from tuneplex.data.pipeline import prepare
    from tuneplex.nn.evaluation import sequence_log_probs
    from tuneplex.nn.preference import preference_loss
    from tuneplex.plugins import registry

    backend = registry().backends["unsloth"].backend
    parsed = validate_job(
        backend.job_schema,
        job(
            {"dpo": dpo},
            model={"name": tiny_model, "max_seq_length": 64},
            dataset={"path": str(tmp_path / "val-pairs.jsonl")},
        ),
    )
    rows = RowTable(prepare(backend.data_spec(parsed)).train.dataset)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    n = len(rows) // 2
    order = [2 * i for i in range(n)] + [2 * i + 1 for i in range(n)]
    with torch.no_grad():
        logps = sequence_log_probs(model, collate(rows.take(order), pad_id=0))
    avg = logps / torch.as_tensor(rows.target_counts[order], dtype=torch.float32)
    d = parsed.training.dpo
    terms = preference_loss(
        avg[:n],
        avg[n:],
        beta=d.ref_policy_kl_penalty,
        loss_type=d.loss_type,
        simpo_gamma=d.simpo_gamma,
    )
    return terms.loss.mean().item()


@pytest.mark.slow
@pytest.mark.parametrize(
    "dpo",
    [
        {"loss_type": "orpo", "ref_policy_kl_penalty": 0.5},
        {"loss_type": "simpo", "ref_policy_kl_penalty": 2.0, "simpo_gamma": 0.5},
    ],
    ids=["orpo", "simpo"],
)
def test_reference_free_runs_are_the_cores_losses_and_learn(
    cpu_seam, capsys, tmp_path, tiny_model, dpo
):
    """TRL's ORPOTrainer / CPOTrainer through the CPU seam: the validation loss before training
    is the core's loss of the same sides (ORPO's NLL term included), no reference copy is
    made, the held-out reward accuracy rises from the starting model's, and final/ loads."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    extra = "training: {dpo: " + json.dumps(dpo) + "}"
    out, _ = dpo_run(capsys, tmp_path, tiny_model, epochs=3, extra=extra, swap=True)
    train, val = events(out, "train"), events(out, "val")
    assert len(train) == 12 and all(set(REWARDS) <= set(e) for e in train + val)
    want = core_validation_loss(tmp_path, tiny_model, dpo)
    assert math.isclose(val[0]["loss"], want, rel_tol=1e-5), (val[0], want)
    before, after = val[0], val[-1]
    print(
        f"unsloth {dpo['loss_type']}: held-out reward accuracy {before['rewards/accuracy']:.3f} "
        f"-> {after['rewards/accuracy']:.3f}, margin {before['rewards/margin']:.4f} -> "
        f"{after['rewards/margin']:.4f}"
    )
    assert after["rewards/accuracy"] > before["rewards/accuracy"] and after["loss"] < want
    assert after["rewards/margin"] > before["rewards/margin"], val
    assert ("sft_loss" in train[0]) == (dpo["loss_type"] == "orpo"), train[0]
    final = out / "final"
    assert not (final / "ref").exists()
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), final)
    assert model.active_adapters == ["default"]
