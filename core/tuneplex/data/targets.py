"""Loss targets: the one rule from (labels, sample boundaries) to what each position predicts.

Position j of a row predicts token j + 1, so its target is `labels[j + 1]`, except where
token j + 1 starts a sample (its position id is 0: a packed sample's first token, or the first
token of a padding tail), where it is IGNORE_INDEX: a sample never learns to predict the next
sample's first token. The last position of a row predicts nothing. A counted target is one
that is not IGNORE_INDEX.

The rule is written twice, for two kinds of data, and `tests/test_data_targets.py` checks that
both give the same counts:
- `next_token_targets` (torch): the targets of a collated (batch, seq) batch;
- `target_counts` (numpy): per row, how many targets count, straight from a prepared split's
  flat columns, before any batch is built (so a step's loss can be normalised without a sync).

Models that shift `labels` themselves (transformers' Trainer, TRL) are given
`unshifted_labels(targets)`: their own shift then yields exactly these targets.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

IGNORE_INDEX = -100
"""A label or target that no loss counts (the value torch's cross-entropy ignores)."""


if TYPE_CHECKING:
    import numpy as np
    import torch

__all__ = [
    "IGNORE_INDEX",
    "next_token_targets",
    "summed_cross_entropy",
    "target_counts",
    "unshifted_labels",
]


def next_token_targets(*, labels: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """(batch, seq) targets of (batch, seq) labels whose samples start where position ids are 0."""
    import torch

    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:].masked_fill(position_ids[:, 1:] == 0, IGNORE_INDEX)
    return targets


def unshifted_labels(targets: torch.Tensor) -> torch.Tensor:
    """Labels for a model that shifts them itself: `targets` moved one place later, so the
    model's shift gives back `targets` and its count of labels != IGNORE_INDEX is theirs."""
    import torch

    labels = torch.full_like(targets, IGNORE_INDEX)
    labels[:, 1:] = targets[:, :-1]
    return labels


def summed_cross_entropy(*, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Float32 cross-entropy summed over the counted targets: what every loss is made of."""
    import torch.nn.functional as F

    return F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def target_counts(
    *, labels: np.ndarray, offsets: np.ndarray, position_ids: np.ndarray | None = None
) -> np.ndarray:
    """Counted targets of each row of flat `labels` (row i is offsets[i]:offsets[i + 1]).

    The same rule as `next_token_targets`, counted by the token predicted: a token counts if its
    label is not IGNORE_INDEX and it does not start a sample (position id 0; without position
    ids, each row is one sample).
    """
    import numpy as np

    counted = labels != IGNORE_INDEX
    if position_ids is not None:
        starts = position_ids == 0
    else:
        starts = np.zeros(len(labels), dtype=bool)
        starts[offsets[:-1][np.diff(offsets) > 0]] = True
    counted &= ~starts
    running = np.concatenate([[0], np.cumsum(counted, dtype=np.int64)])
    return running[offsets[1:]] - running[offsets[:-1]]
