"""Preference losses (DPO and its variants) over per-sequence log-probabilities, and the reward
figures every backend reports. Imports torch when called.

h = (log π(chosen) − log π_ref(chosen)) − (log π(rejected) − log π_ref(rejected))
- sigmoid (DPO, Rafailov et al. 2023): −log σ(β h); with label smoothing ε > 0 the robust DPO
  loss of Chowdhury et al. 2024: (−(1 − ε) log σ(β h) + ε log σ(−β h)) / (1 − 2ε), unbiased
  under preference labels flipped with probability ε;
- ipo (Azar et al. 2023, eq. 17): (h − 1/(2β))²;
- hinge (SLiC, Zhao et al. 2023): max(0, 1 − β h).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

LOSS_TYPES = ("sigmoid", "ipo", "hinge")


@dataclass
class PreferenceTerms:
    """Per pair: the loss and the implicit rewards β (log π − log π_ref) of each side."""

    loss: Any
    chosen_rewards: Any
    rejected_rewards: Any


def preference_loss(
    policy_chosen,
    policy_rejected,
    reference_chosen,
    reference_rejected,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> PreferenceTerms:
    """The per-pair loss of `loss_type` (float32 tensors of log-probabilities, one per pair)."""
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
    else:
        raise ValueError(f"unknown preference loss {loss_type!r}; known: {', '.join(LOSS_TYPES)}")
    return PreferenceTerms(
        loss=loss,
        chosen_rewards=beta * chosen_ratio.detach(),
        rejected_rewards=beta * rejected_ratio.detach(),
    )


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
