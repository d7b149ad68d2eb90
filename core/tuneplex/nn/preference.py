"""Preference losses (DPO and its variants, KTO on pairs, ORPO, SimPO) over per-sequence
log-probabilities, and the reward figures every backend reports. Imports torch when called.

With a reference (β = `beta`, h = (log π(c) − log π_ref(c)) − (log π(r) − log π_ref(r))):
- sigmoid (DPO, Rafailov et al. 2023): −log σ(β h); with label smoothing ε > 0 the robust DPO
  loss of Chowdhury et al. 2024: (−(1 − ε) log σ(β h) + ε log σ(−β h)) / (1 − 2ε), unbiased
  under preference labels flipped with probability ε;
- ipo (Azar et al. 2023, eq. 17): (h − 1/(2β))²;
- hinge (SLiC, Zhao et al. 2023): max(0, 1 − β h);
- kto_pair (KTO on pairs, Ethayarajh et al. 2024, as TRL's DPOTrainer and LLaMA-Factory defined
  it): with ρ_c = log π(c) − log π_ref(c), ρ_r likewise, and the KL reference points
  z_c = max(0, mean ρ_c), z_r = max(0, mean ρ_r) over the pairs of the call (TRL: of the device
  batch; here: of the micro-batch), each pair's loss is the mean of its two halves
  1 − σ(β(ρ_c − z_r)) and 1 − σ(β(z_c − ρ_r)) (so the mean over pairs is TRL's mean over the
  2n halves). As in TRL, gradients flow through z.
Unpaired (`kto_loss`, KTO of Ethayarajh et al. 2024 as TRL's KTOTrainer computes it): each row
has one completion, desirable or not, with ρ = log π(c) − log π_ref(c) (sums of log-probs) and
the reference point z = max(0, mean (log π − log π_ref)) over mismatched prompt/completion pairs,
detached; desirable rows lose w_d (1 − σ(β(ρ − z))), undesirable ones w_u (1 − σ(β(z − ρ))).
Reference-free, on per-token AVERAGE log-probabilities (length-normalised by definition; the
caller divides): with a = mean log π over a side's completion tokens,
- orpo (Hong et al. 2024, eq. 6-7): −a_c + λ · −log σ(log odds(c) − log odds(r)), with
  log odds(p) = a − log(1 − e^a) (computed stably) and λ = `beta`: the chosen side's NLL (mean
  over its tokens) plus the weighted odds-ratio term;
- simpo (Meng et al. 2024, eq. 6): −log σ(β (a_c − a_r) − γ), γ = `simpo_gamma`.

Rewards (`PreferenceTerms`): β (log π − log π_ref) of each side with a reference (the implicit
DPO reward); without one β · a, the policy's scaled average log-probability, as TRL's ORPO and
CPO trainers log them. Accuracy and margin compare these.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "kto_pair", "orpo", "simpo", "kto")
UNPAIRED = ("kto",)
"""Loss types over unpaired rows (`kto_loss`), not pairs (`preference_loss`)."""
REFERENCE_FREE = ("orpo", "simpo")
"""Loss types that compare the policy with no reference model (and read average log-probs)."""

ORPO_MAX_LOG_PROB = -1e-6
"""ORPO's average log-probabilities are clamped below this: log(1 − e^a) is −∞ at a = 0 (every
token certain in fp32), and its gradient with it."""


@dataclass
class PreferenceTerms:
    """Per pair: the loss and the reward of each side (see the module's docstring); for orpo
    also the NLL part of the loss (`nll`, None for the others)."""

    loss: Any
    chosen_rewards: Any
    rejected_rewards: Any
    nll: Any = None


def preference_loss(
    policy_chosen,
    policy_rejected,
    reference_chosen=None,
    reference_rejected=None,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
) -> PreferenceTerms:
    """The per-pair loss of `loss_type` (float tensors of log-probabilities, one per pair:
    sums or averages as the job says; averages for orpo and simpo, whose references are None)."""
    if loss_type in REFERENCE_FREE:
        if reference_chosen is not None or reference_rejected is not None:
            raise ValueError(f"{loss_type} takes no reference log-probabilities")
        return _reference_free(
            policy_chosen, policy_rejected, beta=beta, loss_type=loss_type, gamma=simpo_gamma
        )
    if loss_type not in LOSS_TYPES or loss_type in UNPAIRED:
        raise ValueError(f"unknown preference loss {loss_type!r}; known: {', '.join(LOSS_TYPES)}")
    import torch
    import torch.nn.functional as F

    chosen_ratio = policy_chosen - reference_chosen
    rejected_ratio = policy_rejected - reference_rejected
    h = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        eps = label_smoothing
        loss = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    elif loss_type == "ipo":
        loss = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        loss = F.relu(1 - beta * h)
    else:  # kto_pair
        z_chosen = chosen_ratio.mean().clamp(min=0)
        z_rejected = rejected_ratio.mean().clamp(min=0)
        loss = (
            (1 - torch.sigmoid(beta * (chosen_ratio - z_rejected)))
            + (1 - torch.sigmoid(beta * (z_chosen - rejected_ratio)))
        ) / 2
    return PreferenceTerms(
        loss=loss,
        chosen_rewards=beta * chosen_ratio.detach(),
        rejected_rewards=beta * rejected_ratio.detach(),
    )


def _reference_free(chosen, rejected, *, beta: float, loss_type: str, gamma: float):
    import torch.nn.functional as F

    nll = None
    if loss_type == "orpo":
        chosen_odds = log_odds(chosen.clamp(max=ORPO_MAX_LOG_PROB))
        rejected_odds = log_odds(rejected.clamp(max=ORPO_MAX_LOG_PROB))
        nll = -chosen
        loss = nll - beta * F.logsigmoid(chosen_odds - rejected_odds)
    else:  # simpo
        loss = -F.logsigmoid(beta * (chosen - rejected) - gamma)
    return PreferenceTerms(
        loss=loss,
        chosen_rewards=beta * chosen.detach(),
        rejected_rewards=beta * rejected.detach(),
        nll=nll,
    )


def log_odds(log_p):
    """log(p / (1 − p)) from log p < 0, without cancellation: log(1 − e^x) as log(−expm1(x))
    near 0 and log1p(−e^x) below −ln 2 (Mächler 2012)."""
    import math

    import torch

    log_not_p = torch.where(
        log_p > -math.log(2),
        torch.log(-torch.expm1(log_p)),
        torch.log1p(-torch.exp(log_p)),
    )
    return log_p - log_not_p


def reward_sums(terms: PreferenceTerms) -> Any:
    """[chosen reward, rejected reward, accuracy, margin] summed over the pairs (a float32
    tensor: sums reduce over ranks and micro-batches; divide by the pairs for the means)."""
    import torch

    chosen, rejected = terms.chosen_rewards.float(), terms.rejected_rewards.float()
    return torch.stack(
        [
            chosen.sum(),
            rejected.sum(),
            (chosen > rejected).float().sum(),
            (chosen - rejected).sum(),
        ]
    )


REWARD_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin")
"""The names of `reward_sums`' entries in metrics."""


@dataclass
class KtoTerms:
    """Per row: the (weighted) loss and the reward β (log π − log π_ref); which rows are
    desirable; the reference point z the losses used."""

    loss: Any
    rewards: Any
    desirable: Any
    kl: Any


def kto_reference_point(kl_policy, kl_reference, *, reduce=None) -> Any:
    """z = max(0, mean (log π − log π_ref)) over the mismatched pairs, detached (TRL's KL
    estimate). `reduce` sums a [total, count] tensor over data-parallel ranks (TRL gathers the
    ranks' batch means; with equal batches the same mean)."""
    import torch

    diff = (kl_policy.detach() - kl_reference.detach()).double()
    parts = torch.stack([diff.sum(), torch.tensor(float(diff.numel()), device=diff.device)])
    if reduce is not None:
        parts = reduce(parts)
    return (parts[0] / parts[1].clamp(min=1)).clamp(min=0).to(kl_policy.dtype)


def kto_loss(
    policy,
    reference,
    desirable,
    *,
    kl,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> KtoTerms:
    """Per-row KTO loss (TRL's KTOTrainer, loss_type kto) of rows with log-probabilities
    `policy` and `reference` (sums over each completion), labels `desirable` (bool), and the
    reference point `kl` (`kto_reference_point`)."""
    import torch

    ratio = policy - reference
    desirable = desirable.to(device=ratio.device, dtype=torch.bool)
    loss = torch.where(
        desirable,
        desirable_weight * (1 - torch.sigmoid(beta * (ratio - kl))),
        undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratio))),
    )
    return KtoTerms(loss=loss, rewards=beta * ratio.detach(), desirable=desirable, kl=kl)


def kto_sums(terms: KtoTerms) -> Any:
    """[desirable reward sum, desirable rows, undesirable reward sum, undesirable rows, z ×
    rows] (float32; sums reduce over ranks and micro-batches; `kto_figures` makes the means)."""
    import torch

    r, d = terms.rewards.float(), terms.desirable
    n = float(d.numel())
    return torch.stack(
        [
            r[d].sum(),
            d.float().sum(),
            r[~d].sum(),
            (~d).float().sum(),
            terms.kl.detach().float().reshape(()) * n,
        ]
    )


KTO_SUMS = 5
"""The length of `kto_sums`."""


def kto_figures(sums: list[float]) -> dict[str, float]:
    """TRL's KTO figures from `kto_sums` summed: each label's mean reward (0 with none of it),
    their margin, and the mean reference point `kl`."""
    chosen = sums[0] / sums[1] if sums[1] else 0.0
    rejected = sums[2] / sums[3] if sums[3] else 0.0
    rows = sums[1] + sums[3]
    return {
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
        "rewards/margin": chosen - rejected,
        "kl": sums[4] / rows if rows else 0.0,
    }
