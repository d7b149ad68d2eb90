"""What a model family does to its output head's result before the loss, in one place: the
fused head, the chunked log-probabilities, pipeline stages and distillation all apply it to
match the model's own forward."""

from __future__ import annotations


def logit_rule(config) -> tuple[float | None, float | None]:
    """(divisor, soft cap) a family applies to the head's output before the loss: Granite's
    `logits_scaling`, Gemma 2/3's `final_logit_softcapping`; None where it has none."""
    scaling = getattr(config, "logits_scaling", None)
    cap = getattr(config, "final_logit_softcapping", None)
    return (scaling if scaling not in (None, 1) else None), cap


def finish_logits(config, logits):
    """`logits` as the family's forward finishes them: divided by Granite's `logits_scaling`,
    soft-capped with Gemma 2/3's `final_logit_softcapping`."""
    import torch

    scaling, cap = logit_rule(config)
    if scaling is not None:
        logits = logits / scaling
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits
