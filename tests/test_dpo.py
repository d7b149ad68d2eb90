"""Preference tuning's parts on their own: the losses against their papers' formulas and TRL's
own losses on the same numbers (DPOTrainer's; ORPO's odds_ratio_loss, CPO's simpo branch and
KTOTrainer's loss for the new objectives), and per-row log-probabilities against the model's
full logits (values and gradients)."""

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


def averages(n: int = 6):
    """Per-token average log-probabilities (what orpo and simpo compare), from −4 to −0.01."""
    g = torch.Generator().manual_seed(2)
    return [-(torch.rand(n, generator=g, dtype=torch.float64) * 4 + 0.01) for _ in range(2)]


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def paper_orpo(a_c, a_r, lam: float) -> torch.Tensor:
    """ORPO (Hong et al. 2024) eq. 6-7 per pair: −log P(c) (the mean over its tokens) + λ ·
    −log σ(log odds(c) − log odds(r)), odds(p) = p / (1 − p), P = e^(average log-prob)."""
    out = []
    for a, b in zip(a_c.tolist(), a_r.tolist(), strict=True):
        p, q = math.exp(a), math.exp(b)
        ratio = math.log((p / (1 - p)) / (q / (1 - q)))
        out.append(-a - lam * math.log(sig(ratio)))
    return torch.tensor(out, dtype=torch.float64)


def paper_simpo(a_c, a_r, beta: float, gamma: float) -> torch.Tensor:
    """SimPO (Meng et al. 2024) eq. 6 per pair: −log σ(β/|y_w| log π(y_w|x) − β/|y_l| log
    π(y_l|x) − γ), the length-normalised log-probabilities given as averages."""
    pairs = zip(a_c.tolist(), a_r.tolist(), strict=True)
    return torch.tensor(
        [-math.log(sig(beta * (a - b) - gamma)) for a, b in pairs], dtype=torch.float64
    )


def paper_kto_pair(pc, pr, rc, rr, beta: float) -> torch.Tensor:
    """KTO on pairs (TRL's former DPOTrainer kto_pair, LLaMA-Factory's): the chosen half against
    the rejected sides' KL estimate and the other way round; each pair the mean of its halves."""
    rho_c = [a - c for a, c in zip(pc.tolist(), rc.tolist(), strict=True)]
    rho_r = [b - d for b, d in zip(pr.tolist(), rr.tolist(), strict=True)]
    z_c, z_r = max(0.0, sum(rho_c) / len(rho_c)), max(0.0, sum(rho_r) / len(rho_r))
    halves = [
        ((1 - sig(beta * (x - z_r))) + (1 - sig(beta * (z_c - y)))) / 2
        for x, y in zip(rho_c, rho_r, strict=True)
    ]
    return torch.tensor(halves, dtype=torch.float64)


def device_of_cpu():
    return SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda t: t)


def test_orpo_is_its_paper_and_trls_odds_ratio_loss():
    pytest.importorskip("trl")
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    a_c, a_r = averages()
    lam = 0.2
    got = preference_loss(a_c, a_r, beta=lam, loss_type="orpo")
    torch.testing.assert_close(got.loss, paper_orpo(a_c, a_r, lam), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(got.nll, -a_c)
    fake = SimpleNamespace(beta=lam, accelerator=device_of_cpu())
    trl_ratio, chosen, rejected, *_ = ORPOTrainer.odds_ratio_loss(fake, a_c.float(), a_r.float())
    ours32 = preference_loss(a_c.float(), a_r.float(), beta=lam, loss_type="orpo")
    # TRL's loss is its NLL minus the mean of these (λ log σ(...)): the odds-ratio term
    assert (ours32.loss - ours32.nll + trl_ratio).abs().max().item() <= 1e-6
    torch.testing.assert_close(got.chosen_rewards.float(), chosen)  # β × average log-prob
    torch.testing.assert_close(got.rejected_rewards.float(), rejected)


def test_orpo_log_odds_are_finite_near_certainty():
    """log(1 − p) with p → 1: finite values and gradients, where a naive log1p(−exp) is −inf."""
    a = torch.tensor([-1e-9, -1e-7, -1e-4, -0.5, -30.0], dtype=torch.float32, requires_grad=True)
    terms = preference_loss(a, a.detach() - 1, beta=0.1, loss_type="orpo")
    terms.loss.sum().backward()
    assert torch.isfinite(terms.loss).all() and torch.isfinite(a.grad).all()


def test_simpo_is_its_paper_and_trls_cpo_simpo():
    pytest.importorskip("trl")
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    a_c, a_r = averages()
    beta, gamma = 2.0, 0.7
    got = preference_loss(a_c, a_r, beta=beta, loss_type="simpo", simpo_gamma=gamma)
    torch.testing.assert_close(got.loss, paper_simpo(a_c, a_r, beta, gamma), rtol=1e-6, atol=1e-9)
    fake = SimpleNamespace(
        beta=beta,
        alpha=0.0,
        loss_type="simpo",
        simpo_gamma=gamma,
        label_smoothing=0.0,
        accelerator=device_of_cpu(),
    )
    theirs, chosen, rejected = CPOTrainer.cpo_loss(fake, a_c.float(), a_r.float())
    ours32 = preference_loss(
        a_c.float(), a_r.float(), beta=beta, loss_type="simpo", simpo_gamma=gamma
    )
    assert (ours32.loss - theirs).abs().max().item() <= 1e-6
    torch.testing.assert_close(got.chosen_rewards.float(), chosen)
    torch.testing.assert_close(got.rejected_rewards.float(), rejected)


def trl_kto_loss(
    logps,
    ref,
    kl_logps,
    kl_ref,
    *,
    desirable,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> float:
    """TRL's KTOTrainer._compute_loss on completions labelled `desirable` (one bool for all,
    or one per row), with the KL reference point estimated from `kl_logps` − `kl_ref` (its
    mismatched completions): precomputed reference, one completion token each."""
    from trl.trainer.kto_trainer import KTOTrainer

    n = logps.numel()
    per_token = {0: logps.float().unsqueeze(1), 1: kl_logps.float().unsqueeze(1)}

    class Model(torch.nn.Module):
        def forward(self, input_ids, **_):
            lp = per_token[int(input_ids[0, 0])]
            zeros = torch.zeros_like(lp)
            return SimpleNamespace(log_probs=lp, entropy=zeros, mean_logits=zeros)

    model = Model().train()
    fake = SimpleNamespace(
        model=model,
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda t: t),
        calculate_KL=True,
        precompute_ref_logps=True,
        loss_type="kto",
        beta=beta,
        desirable_weight=desirable_weight,
        undesirable_weight=undesirable_weight,
        aux_loss_enabled=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    fake._compute_kl_logps = lambda m, b: KTOTrainer._compute_kl_logps(fake, m, b)
    ones = torch.ones(n, 2, dtype=torch.long)
    inputs = {
        "input_ids": torch.tensor([[0, 1]] * n),
        "attention_mask": ones,
        "completion_mask": torch.tensor([[0, 1]] * n),
        "KL_input_ids": torch.tensor([[1, 1]] * n),
        "KL_attention_mask": ones,
        "KL_completion_mask": torch.tensor([[0, 1]] * n),
        "label": desirable if torch.is_tensor(desirable) else torch.full((n,), desirable),
        "ref_logps": ref.float(),
        "ref_KL_logps": kl_ref.float(),
    }
    return KTOTrainer._compute_loss(fake, model, inputs, return_outputs=False).item()


def test_kto_pair_is_its_definition_and_trls_kto_halves():
    """Each half of kto_pair is TRL's KTO loss: the chosen sides as desirable completions with
    the rejected sides as the KL estimate's completions, and the other way round."""
    pytest.importorskip("trl")
    pc, pr, rc, rr = (t / 20 for t in numbers())  # ratios of a few nats: σ away from 0 and 1
    beta = 0.3
    got = preference_loss(pc, pr, rc, rr, beta=beta, loss_type="kto_pair")
    torch.testing.assert_close(got.loss, paper_kto_pair(pc, pr, rc, rr, beta), rtol=1e-6, atol=1e-9)
    chosen_half = trl_kto_loss(pc, rc, pr, rr, desirable=True, beta=beta)
    rejected_half = trl_kto_loss(pr, rr, pc, rc, desirable=False, beta=beta)
    ours32 = preference_loss(
        *(t.float() for t in (pc, pr, rc, rr)), beta=beta, loss_type="kto_pair"
    )
    assert abs(ours32.loss.mean().item() - (chosen_half + rejected_half) / 2) <= 1e-6
    torch.testing.assert_close(got.chosen_rewards, beta * (pc - rc))


def paper_kto(p, r, kl_p, kl_r, desirable, beta: float, w_d: float, w_u: float) -> list[float]:
    """Unpaired KTO per row (Ethayarajh et al. 2024, eq. 7 as TRL computes it), in float64
    Python arithmetic: z = max(0, mean of the mismatched pairs' log-ratios)."""
    ratios = [a - b for a, b in zip(kl_p.tolist(), kl_r.tolist(), strict=True)]
    z = max(0.0, sum(ratios) / len(ratios))
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    out = []
    for a, b, d in zip(p.tolist(), r.tolist(), desirable.tolist(), strict=True):
        rho = a - b
        out.append(w_d * (1 - sig(beta * (rho - z))) if d else w_u * (1 - sig(beta * (z - rho))))
    return out


def test_kto_is_its_definition_and_trls_kto_loss():
    """Unpaired KTO on mixed labels and weights: per row the paper's formula (1e-6), and its
    mean TRL's KTOTrainer loss on the same numbers (1e-6); z is the clamped mean log-ratio of
    the mismatched pairs, detached (no gradient flows through it)."""
    pytest.importorskip("trl")
    from tuneplex.nn.preference import kto_figures, kto_loss, kto_reference_point, kto_sums

    p, r, kl_p, kl_r = (t / 20 for t in numbers(8))
    # a positive reference point (the clamp at 0 is tested below), one pair below 0
    kl_p = kl_r + torch.linspace(-0.1, 0.5, 8, dtype=torch.float64)
    desirable = torch.tensor([True, False, True, True, False, True, False, False])
    beta, w_d, w_u = 0.3, 1.33, 0.7
    p = p.clone().requires_grad_(True)
    kl_p = kl_p.clone().requires_grad_(True)
    z = kto_reference_point(kl_p, kl_r)
    assert z.item() > 0 and not z.requires_grad
    got = kto_loss(p, r, desirable, kl=z, beta=beta, desirable_weight=w_d, undesirable_weight=w_u)
    want = paper_kto(p.detach(), r, kl_p.detach(), kl_r, desirable, beta, w_d, w_u)
    assert max(abs(a - b) for a, b in zip(got.loss.tolist(), want, strict=True)) <= 1e-6
    theirs = trl_kto_loss(
        p.detach(), r, kl_p.detach(), kl_r, desirable=desirable, beta=beta,
        desirable_weight=w_d, undesirable_weight=w_u,
    )  # fmt: skip
    z32 = kto_reference_point(kl_p.float(), kl_r.float())
    ours32 = kto_loss(
        p.detach().float(), r.float(), desirable, kl=z32, beta=beta,
        desirable_weight=w_d, undesirable_weight=w_u,
    )  # fmt: skip
    assert abs(ours32.loss.mean().item() - theirs) <= 1e-6
    got.loss.sum().backward()
    assert kl_p.grad is None  # z is detached, as in TRL
    figures = kto_figures(kto_sums(got).tolist())
    rewards = beta * (p.detach() - r)
    assert math.isclose(figures["rewards/chosen"], rewards[desirable].mean().item(), rel_tol=1e-5)
    assert math.isclose(
        figures["rewards/rejected"], rewards[~desirable].mean().item(), rel_tol=1e-5
    )
    assert math.isclose(figures["kl"], z.item(), rel_tol=1e-6)
    below = kto_reference_point(kl_r - 1.0, kl_r)  # the policy below the reference: z = 0
    assert below.item() == 0.0


def test_kto_reference_point_sums_over_ranks():
    """With `reduce` (the data-parallel sum of [total, count]) z is the mean over every
    rank's mismatched pairs, a rank with none included; here two ranks by hand."""
    from tuneplex.nn.preference import kto_reference_point

    a, b = torch.tensor([0.5, 1.5, 1.0]), torch.tensor([3.0])
    zero = torch.zeros(0)
    other = {"a": torch.tensor([b.sum().item(), 1.0], dtype=torch.float64)}
    z = kto_reference_point(a, torch.zeros(3), reduce=lambda t: t + other["a"])
    assert z.item() == pytest.approx(6.0 / 4)
    empty = kto_reference_point(zero, zero, reduce=lambda t: t + other["a"])
    assert empty.item() == pytest.approx(3.0)


def test_reference_free_losses_refuse_a_reference():
    a_c, a_r = averages()
    for kind in ("orpo", "simpo"):
        with pytest.raises(ValueError, match="takes no reference"):
            preference_loss(a_c, a_r, a_c, a_r, beta=0.1, loss_type=kind)


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
