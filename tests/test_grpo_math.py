"""GRPO's arithmetic (tuneplex.nn.grpo) against hand-computed numbers and the published
formulas: NeMo-RL's per-prompt baseline and clipped policy-gradient loss, TRL's GRPO loss."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from tuneplex.nn.grpo import (  # noqa: E402
    ClipSettings,
    advantages,
    clipped_pg_loss,
    group_baseline,
    k3_kl,
)


def t(x):
    return torch.tensor(x, dtype=torch.float64)


def test_group_mean_baseline_and_normalised_advantages():
    adv = advantages(t([[1.0, 0.0, 0.0, 1.0]]), use_rloo=False, normalize_rewards=True)
    assert adv.tolist() == [[1.0, -1.0, -1.0, 1.0]]  # (r - 0.5) / 0.5
    raw = advantages(t([[1.0, 0.0, 0.0, 1.0]]), use_rloo=False, normalize_rewards=False)
    assert raw.tolist() == [[0.5, -0.5, -0.5, 0.5]]


def test_leave_one_out_baseline():
    baseline, std = group_baseline(t([[1.0, 0.0, 0.0, 1.0]]), leave_one_out=True)
    assert baseline[0].tolist() == pytest.approx([1 / 3, 2 / 3, 2 / 3, 1 / 3])
    assert std[0].tolist() == pytest.approx([math.sqrt(2 / 9)] * 4)
    adv = advantages(t([[1.0, 0.0, 0.0, 1.0]]), use_rloo=True, normalize_rewards=True)
    assert adv[0].tolist() == pytest.approx(
        [math.sqrt(2), -math.sqrt(2), -math.sqrt(2), math.sqrt(2)]
    )
    # three rewards: r - mean of the other two
    raw = advantages(t([[3.0, 1.0, 2.0]]), use_rloo=True, normalize_rewards=False)
    assert raw[0].tolist() == pytest.approx([1.5, -1.5, 0.0])


def test_groups_without_variation_or_members_teach_nothing():
    same = advantages(t([[0.7, 0.7, 0.7], [1.0, 0.0, 1.0]]), use_rloo=False, normalize_rewards=True)
    assert same[0].tolist() == [0.0, 0.0, 0.0]
    assert same[1].tolist() == pytest.approx([math.sqrt(0.5), -math.sqrt(2), math.sqrt(0.5)])
    # one valid member: its baseline is its own reward; invalid members count in no baseline
    valid = t([[1.0, 0.0, 0.0]])
    adv = advantages(t([[1.0, 5.0, 9.0]]), use_rloo=False, normalize_rewards=False, valid=valid)
    assert adv[0, 0].item() == 0.0
    valid = t([[1.0, 1.0, 0.0]])
    adv = advantages(t([[1.0, 3.0, 100.0]]), use_rloo=False, normalize_rewards=False, valid=valid)
    assert adv[0, :2].tolist() == [-1.0, 1.0]  # the truncated 100 is not in the baseline


def test_k3_kl():
    assert k3_kl(t(-1.0), t(-2.0)).item() == pytest.approx(math.exp(-1.0))  # e^-1 + 1 - 1
    assert k3_kl(t(-1.0), t(-1.0)).item() == 0.0


def _loss(lp, old, adv, **kw):
    settings = ClipSettings(
        **{k: v for k, v in kw.items() if k in ClipSettings.__dataclass_fields__}
    )
    rest = {k: v for k, v in kw.items() if k not in ClipSettings.__dataclass_fields__}
    mask = rest.pop("mask", torch.ones_like(lp))
    return clipped_pg_loss(
        logprobs=lp, old_logprobs=old, advantages=adv, mask=mask, settings=settings, **rest
    )


def test_clipping_by_hand():
    old = t([[0.0, 0.0]])
    on = t([[0.0, 0.0]])
    assert _loss(on, old, t([2.0]))[0].item() == pytest.approx(-2.0)  # ratio 1: -A
    far = t([[0.5, 0.5]])  # ratio e^0.5 = 1.6487 > 1.2
    loss, fig = _loss(far, old, t([1.0]))
    assert loss.item() == pytest.approx(-1.2)  # the clipped term binds for A > 0
    assert fig["clip_fraction"].item() == 1.0 and fig["ratio"].item() == pytest.approx(
        math.exp(0.5)
    )
    loss, fig = _loss(far, old, t([-1.0]))
    assert loss.item() == pytest.approx(math.exp(0.5))  # A < 0: the ratio term is larger
    assert fig["clip_fraction"].item() == 0.0
    very = t([[1.5, 1.5]])  # ratio 4.48
    assert _loss(very, old, t([-1.0]))[0].item() == pytest.approx(math.exp(1.5))
    assert _loss(very, old, t([-1.0]), ratio_clip_c=3.0)[0].item() == pytest.approx(3.0)
    # asymmetric: [1 - 0.1, 1 + 0.3]
    loss, _ = _loss(far, old, t([1.0]), ratio_clip_min=0.1, ratio_clip_max=0.3)
    assert loss.item() == pytest.approx(-1.3)
    low = t([[-0.5, -0.5]])
    loss, _ = _loss(low, old, t([-1.0]), ratio_clip_min=0.1, ratio_clip_max=0.3)
    assert loss.item() == pytest.approx(0.9)


def test_token_and_sequence_level_averaging():
    lp = old = t([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    mask = t([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    adv = t([1.0, -2.0])
    token = _loss(lp, old, adv, mask=mask)[0].item()
    assert token == pytest.approx((-1 - 1 - 1 + 2) / 4)
    seq = _loss(lp, old, adv, mask=mask, token_level_loss=False)[0].item()
    assert seq == pytest.approx((-1 + 2) / 2)
    # with the step's totals, micro-batch shares add up to the whole step's mean
    parts = [
        _loss(lp[i : i + 1], old[i : i + 1], adv[i : i + 1], mask=mask[i : i + 1], tokens=4.0)[0]
        for i in range(2)
    ]
    assert sum(p.item() for p in parts) == pytest.approx(token)


def test_kl_penalty_and_on_policy_weights():
    lp, old, ref = t([[-1.0, -2.0]]), t([[-1.0, -2.0]]), t([[-2.0, -2.0]])
    loss, fig = _loss(lp, old, t([0.0]), ref_logprobs=ref, ref_policy_kl_penalty=0.1)
    kl = (math.exp(-1.0) + 0.0) / 2
    assert fig["kl"].item() == pytest.approx(kl)
    assert loss.item() == pytest.approx(0.1 * kl)
    gen = t([[-1.5, -2.0]])  # the generator's log-probs differ: the on-policy weights exp(lp - gen)
    _, fig = _loss(
        lp,
        old,
        t([0.0]),
        ref_logprobs=ref,
        generation_logprobs=gen,
        ref_policy_kl_penalty=0.1,
        use_on_policy_kl_approximation=True,
    )
    assert fig["kl"].item() == pytest.approx((math.exp(0.5) * math.exp(-1.0)) / 2)
    loss, _ = _loss(
        lp, old, t([1.0]), generation_logprobs=gen, use_importance_sampling_correction=True
    )
    assert loss.item() == pytest.approx(-(math.exp(0.5) + 1.0) / 2)


def test_equals_trls_grpo_loss_where_both_define_it():
    """TRL's GRPO loss (token-level over the batch's completion tokens, β × k3 KL per token):
    per token -min(r·A, clip(r, 1-ε, 1+ε)·A) + β·(exp(ref - lp) - (ref - lp) - 1)."""
    gen = torch.Generator().manual_seed(0)
    lp = -torch.rand(6, 9, generator=gen, dtype=torch.float64) * 3
    old = lp + (torch.rand(6, 9, generator=gen, dtype=torch.float64) - 0.5) * 0.8
    ref = lp + (torch.rand(6, 9, generator=gen, dtype=torch.float64) - 0.5)
    adv = torch.randn(6, generator=gen, dtype=torch.float64)
    mask = (torch.rand(6, 9, generator=gen) > 0.3).to(torch.float64)
    beta, eps = 0.04, 0.2
    ratio = (lp - old).exp()
    per_token = -torch.min(ratio * adv[:, None], ratio.clamp(1 - eps, 1 + eps) * adv[:, None])
    per_token = per_token + beta * ((ref - lp).exp() - (ref - lp) - 1)
    trl = (per_token * mask).sum() / mask.sum()
    ours, _ = _loss(lp, old, adv, mask=mask, ref_logprobs=ref, ref_policy_kl_penalty=beta)
    assert ours.item() == pytest.approx(trl.item(), abs=1e-6)
    # TRL's "grpo" loss type averages per sequence first: sequence-level here
    per_seq = ((per_token * mask).sum(-1) / mask.sum(-1)).mean()
    ours, _ = _loss(
        lp,
        old,
        adv,
        mask=mask,
        ref_logprobs=ref,
        ref_policy_kl_penalty=beta,
        token_level_loss=False,
    )
    assert ours.item() == pytest.approx(per_seq.item(), abs=1e-6)


def test_gradients_flow_to_the_policys_log_probs_only():
    lp = t([[-1.0, -0.5]]).requires_grad_()
    old, ref = t([[-1.0, -0.5]]), t([[-1.2, -0.4]])
    loss, _ = _loss(lp, old, t([1.0]), ref_logprobs=ref, ref_policy_kl_penalty=0.1)
    loss.backward()
    # d/dlp of -A·exp(lp - old) at ratio 1 is -A; of β·k3 it is β·(1 - exp(ref - lp)); /2 tokens
    want = [(-1.0 + 0.1 * (1 - math.exp(r - x))) / 2 for x, r in ((-1.0, -1.2), (-0.5, -0.4))]
    assert lp.grad[0].tolist() == pytest.approx(want)
