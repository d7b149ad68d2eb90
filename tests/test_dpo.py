"""Preference tuning's parts on their own: the losses against their papers' formulas and TRL's
own DPO loss on the same numbers, and per-row log-probabilities against the model's full
logits (values and gradients)."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")

from tuneplex.nn.preference import preference_loss, reward_sums  # noqa: E402

F = torch.nn.functional


def numbers(n: int = 6):
    g = torch.Generator().manual_seed(1)
    return [-(torch.rand(n, generator=g, dtype=torch.float64) * 40 + 1) for _ in range(4)]


def paper(kind: str, pc, pr, rc, rr, beta: float, eps: float = 0.0):
    """Each loss as its paper writes it, per pair, in float64 Python arithmetic."""
    out = []
    for a, b, c, d in zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist(), strict=True):
        h = (a - c) - (b - d)
        sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
        if kind == "sigmoid":  # DPO eq. 7; robust DPO (Chowdhury et al. 2024) eq. 6
            clean, flipped = -math.log(sig(beta * h)), -math.log(sig(-beta * h))
            out.append(((1 - eps) * clean - eps * flipped) / (1 - 2 * eps))
        elif kind == "ipo":  # IPO eq. 17
            out.append((h - 1 / (2 * beta)) ** 2)
        else:  # SLiC hinge
            out.append(max(0.0, 1 - beta * h))
    return torch.tensor(out, dtype=torch.float64)


def trl_loss(kind: str, pc, pr, rc, rr, beta: float, eps: float = 0.0) -> float:
    """TRL's DPOTrainer._compute_loss on these per-sequence log-probabilities (one completion
    token each, so its per-token and per-sequence figures coincide; reference precomputed)."""
    from trl.trainer.dpo_trainer import DPOTrainer

    n = pc.numel()
    logps = torch.cat([pc, pr]).float().unsqueeze(1)  # [2n, 1]: the completion's one token
    zeros = torch.zeros_like(logps)

    class Model(torch.nn.Module):
        def forward(self, **_):
            return SimpleNamespace(
                log_probs=logps,
                entropy=zeros,
                mean_logits=zeros,
                is_top1=zeros.bool(),
            )

    identity = SimpleNamespace(
        device=torch.device("cpu"), gather_for_metrics=lambda t: t, gather=lambda t: t
    )
    model = Model().train()
    fake = SimpleNamespace(
        model=model,
        accelerator=identity,
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=["robust" if eps else kind],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=eps,
        use_weighting=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": torch.ones(2 * n, 2, dtype=torch.long),
        "attention_mask": torch.ones(2 * n, 2, dtype=torch.long),
        "completion_mask": torch.tensor([[0, 1]] * (2 * n)),
        "ref_chosen_logps": rc.float(),
        "ref_rejected_logps": rr.float(),
    }
    return DPOTrainer._compute_loss(fake, model, inputs, return_outputs=False).item()


@pytest.mark.parametrize(
    ("kind", "eps"), [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0), ("hinge", 0.0)]
)
def test_losses_are_their_papers_and_trls(kind, eps):
    pytest.importorskip("trl")
    pc, pr, rc, rr = numbers()
    beta = 0.1
    got = preference_loss(pc, pr, rc, rr, beta=beta, loss_type=kind, label_smoothing=eps)
    want = paper(kind, pc, pr, rc, rr, beta, eps)
    torch.testing.assert_close(got.loss, want, rtol=1e-6, atol=1e-9)
    ours32 = preference_loss(
        *(t.float() for t in (pc, pr, rc, rr)), beta=beta, loss_type=kind, label_smoothing=eps
    )
    assert abs(ours32.loss.mean().item() - trl_loss(kind, pc, pr, rc, rr, beta, eps)) <= 1e-6 * max(
        1.0, abs(want.mean().item())
    )
    torch.testing.assert_close(got.chosen_rewards, beta * (pc - rc))
    torch.testing.assert_close(got.rejected_rewards, beta * (pr - rr))


def test_equal_policy_and_reference_give_ln2_and_zero_rewards():
    pc, pr, _, _ = numbers()
    terms = preference_loss(pc, pr, pc.clone(), pr.clone(), beta=0.05)
    torch.testing.assert_close(terms.loss, torch.full_like(pc, math.log(2)))
    sums = reward_sums(terms)
    assert sums.tolist() == [0.0, 0.0, 0.0, 0.0]


def test_reward_sums_are_sums_over_pairs():
    terms = SimpleNamespace(
        chosen_rewards=torch.tensor([0.5, -0.1, 0.2]),
        rejected_rewards=torch.tensor([0.1, 0.3, -0.2]),
    )
    chosen, rejected, accuracy, margin = reward_sums(terms).tolist()
    assert (round(chosen, 6), round(rejected, 6), accuracy, round(margin, 6)) == (
        0.6,
        0.2,
        2.0,
        0.4,
    )


@pytest.mark.parametrize("ft", ["all_weights", "lora"])
def test_row_log_probs_equal_the_full_logits(ft, tokenizers, monkeypatch):
    """Per-row sums of counted targets' log-probabilities: values within 1e-5 and gradients of
    a weighted sum of them (each row its own upstream gradient, as DPO gives) within 1e-5."""
    from helpers import build_family
    from tuneplex.data.collate import collate
    from tuneplex.data.targets import IGNORE_INDEX as X
    from tuneplex.nn import evaluation, linear_ce
    from tuneplex_automodel.model import apply_lora

    tok = tokenizers["chatml"][1]
    model = build_family("Qwen3ForCausalLM", tok).train()
    if ft == "lora":
        model = apply_lora(model, rank=4, alpha=8, target_modules=None)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02)
    monkeypatch.setattr(linear_ce, "HEAD_CHUNK_ELEMENTS", len(tok) * 3)  # several chunks
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, len(tok), (3, 12), generator=g).tolist()
    rows = [
        {"input_ids": ids[0], "labels": [X] * 5 + ids[0][5:]},
        {"input_ids": ids[1][:7], "labels": [X] * 4 + ids[1][4:7]},
        {"input_ids": ids[2], "labels": [X] * 9 + ids[2][9:]},
    ]
    batch = collate(rows, pad_id=0)
    weights = torch.tensor([0.7, -1.3, 2.0])
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def direct(model, batch, autocast=None):
        logits = model(**evaluation._inputs(batch)).logits.float()
        logps = logits.log_softmax(-1)
        t = batch["targets"]
        picked = logps.gather(-1, t.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return torch.where(t != X, picked, 0.0).sum(-1)

    results = []
    for fn in (direct, evaluation.sequence_log_probs):
        model.zero_grad(set_to_none=True)
        sums = fn(model, batch)
        (weights * sums).sum().backward()
        grads = {n: p.grad.clone() for n, p in trained if p.grad is not None}
        results.append((sums.detach(), grads))
    (want, want_grads), (got, got_grads) = results
    assert got.shape == (3,) and (want < 0).all()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    assert got_grads.keys() == want_grads.keys() and len(got_grads) == len(trained)
    for name, gr in want_grads.items():
        assert (got_grads[name] - gr).abs().max() <= 1e-5 * gr.abs().max(), name
