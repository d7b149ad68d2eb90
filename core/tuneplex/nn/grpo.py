"""The arithmetic of reinforcement learning from rewards (GRPO), on tensors only.

Advantages per prompt group and the clipped policy-gradient loss with the KL penalty to a
reference, as NeMo-RL's `ClippedPGLossFn` and its per-prompt baseline define them (the names
are the v1 hyperparameters'): no model, no data, so that every backend and every parallel
layout computes the same numbers, and a test can check them against hand-computed values.

Shapes: rewards `[prompts, generations]`; per-token tensors `[samples, tokens]` where a sample
is one completion and `mask` marks its generated tokens that count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


def group_baseline(rewards, *, valid=None, leave_one_out: bool):
    """(baseline, std) per sample, `[prompts, generations]`: the mean reward of the sample's
    group — of the other members only with `leave_one_out` (RLOO) — and the standard
    deviation from the same members' moments. Invalid samples count in no baseline; a group
    with one valid sample or none has its own reward as baseline (advantage 0) and std 0."""
    import torch

    shift = rewards[:, :1].to(torch.float64)  # moments of r - r_0: a group of equal rewards is
    rewards = rewards.to(torch.float64) - shift  # exactly 0 everywhere, not rounding noise
    valid = torch.ones_like(rewards) if valid is None else valid.to(torch.float64)
    k = rewards.shape[1]
    others = 1.0 - torch.eye(k, dtype=rewards.dtype, device=rewards.device)
    members = others if leave_one_out else torch.ones_like(others)
    count = (valid.sum(-1, keepdim=True) - float(leave_one_out)).clamp(min=1)
    mean = (rewards * valid) @ members.T / count
    # each sample's members' squared distances from its baseline: exact 0 for equal rewards
    weights = members * valid.unsqueeze(1)  # [P, i, j]: j counts in sample i's baseline
    spread = (rewards.unsqueeze(1) - mean.unsqueeze(2)).square()
    std = ((weights * spread).sum(-1) / count).sqrt()
    alone = valid.sum(-1, keepdim=True) <= 1
    baseline = torch.where(alone, rewards, mean) + shift
    return baseline, torch.where(alone, torch.zeros_like(std), std)


def advantages(rewards, *, use_rloo: bool, normalize_rewards: bool, valid=None):
    """Reward minus its group's baseline, divided by the group's std with
    `normalize_rewards` (where the std is 0 the advantage stays as it is: a group whose
    members all scored the same teaches nothing and is not sharpened). Float32, `[P, G]`."""
    import torch

    baseline, std = group_baseline(rewards, valid=valid, leave_one_out=use_rloo)
    adv = rewards.to(torch.float64) - baseline
    if normalize_rewards:
        adv = torch.where(std > 0, adv / std.clamp(min=1e-12), adv)
    return adv.to(torch.float32)


def k3_kl(logprobs, ref_logprobs):
    """Schulman's k3 estimator of KL(π‖π_ref) per token: exp(r) - r - 1, r = log π_ref - log π
    (never negative, unbiased under samples from π)."""
    r = ref_logprobs - logprobs
    return r.exp() - r - 1


@dataclass(frozen=True, kw_only=True)
class ClipSettings:
    """The v1 `grpo` block's loss settings."""

    ratio_clip_min: float = 0.2
    ratio_clip_max: float = 0.2
    ratio_clip_c: float | None = None
    ref_policy_kl_penalty: float = 0.0
    use_on_policy_kl_approximation: bool = False
    use_importance_sampling_correction: bool = False
    token_level_loss: bool = True


def masked_mean(values, mask, *, dim=None, total=None):
    """Sum of `values` where `mask`, over `total` (default: the mask's own count): with a global
    `total`, micro-batches' shares add up to the mean over the whole step."""

    n = mask.sum(dim) if total is None else total
    return (values * mask).sum(dim) / (
        n + 1e-8 if isinstance(n, float | int) else n.clamp(min=1e-8)
    )


def clipped_pg_loss(
    *,
    logprobs,
    old_logprobs,
    advantages,
    mask,
    settings: ClipSettings,
    ref_logprobs=None,
    generation_logprobs=None,
    tokens: float | None = None,
    samples: float | None = None,
) -> tuple[Any, dict[str, Any]]:
    """(loss, figures) of the clipped policy gradient with the KL penalty.

    `logprobs` are the policy's now (with gradients), `old_logprobs` the policy's when the
    rollouts were scored (the ratio's denominator), `generation_logprobs` the generator's (the
    importance-sampling correction and the on-policy KL weights; default `old_logprobs`).
    `advantages` are per sample `[B]` or per token `[B, T]`. `tokens` / `samples` are the
    step's totals across micro-batches and ranks (default: this batch's), so that a step's
    micro-batch losses add up to its mean. Figures are detached scalars: `kl` (the penalty's
    KL before β), `clip_fraction` (tokens whose clipped term was taken), `ratio` (mean)."""
    import torch

    s = settings
    mask = mask.to(logprobs.dtype)
    adv = advantages if advantages.dim() == 2 else advantages.unsqueeze(-1)
    generated = old_logprobs if generation_logprobs is None else generation_logprobs

    def mean(values):
        if s.token_level_loss:
            return masked_mean(values, mask, total=tokens)
        per_sample = masked_mean(values, mask, dim=-1)
        has = (mask.sum(-1) > 0).to(values.dtype)
        return masked_mean(per_sample, has, total=samples)

    ratio = (logprobs - old_logprobs).exp()
    clamped = ratio.clamp(1.0 - s.ratio_clip_min, 1.0 + s.ratio_clip_max)
    unclipped_loss, clipped_loss = -adv * ratio, -adv * clamped
    loss_tokens = torch.max(unclipped_loss, clipped_loss)
    if s.ratio_clip_c is not None:
        loss_tokens = torch.where(
            adv < 0, torch.min(loss_tokens, -adv * s.ratio_clip_c), loss_tokens
        )
    if s.use_importance_sampling_correction:
        weights = torch.nan_to_num(
            (old_logprobs - generated).exp(), nan=0.0, posinf=0.0, neginf=0.0
        )
        loss_tokens = weights.detach() * loss_tokens
    loss = mean(loss_tokens)
    kl = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    if s.ref_policy_kl_penalty != 0 or ref_logprobs is not None:
        if ref_logprobs is None:
            raise ValueError("a KL penalty needs the reference's log-probabilities")
        per_token = k3_kl(logprobs, ref_logprobs)
        if s.use_on_policy_kl_approximation:
            w = torch.nan_to_num((logprobs - generated).exp(), nan=0.0, posinf=0.0, neginf=0.0)
            per_token = w.detach() * per_token
        kl = mean(per_token)
        loss = loss + s.ref_policy_kl_penalty * kl
    with torch.no_grad():
        taken = (clipped_loss > unclipped_loss).to(mask.dtype)
        figures = {
            "kl": kl.detach(),
            "clip_fraction": masked_mean(taken, mask, total=tokens),
            "ratio": masked_mean(ratio.detach(), mask, total=tokens),
        }
    return loss, figures
