"""The loss-target rule (`tuneplex.data.targets`) and the padding rule (`collate.pad_rows`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tuneplex.data.collate import RowTable, collate, collate_for_hf, pad_rows
from tuneplex.data.targets import (
    IGNORE_INDEX,
    next_token_targets,
    summed_cross_entropy,
    target_counts,
    unshifted_labels,
)

X = IGNORE_INDEX
# one packed row of three samples (3, 2 and 4 tokens); each sample's first label is masked
# by its template, and the middle one trains only its last token
PACKED = {
    "input_ids": [11, 12, 13, 21, 22, 31, 32, 33, 34],
    "labels": [X, 12, 13, X, 22, X, 32, 33, 34],
    "position_ids": [0, 1, 2, 0, 1, 0, 1, 2, 3],
}
PLAIN = {"input_ids": [41, 42, 43, 44], "labels": [41, 42, X, 44]}


def test_targets_of_a_packed_row_stop_at_every_sample_boundary():
    batch = collate([PACKED], pad_id=0)
    # position j predicts token j + 1; never a next sample's first token, nothing at the end
    want = [12, 13, X, 22, X, 32, 33, 34, X]
    assert batch["targets"][0].tolist() == want
    assert torch.equal(
        batch["targets"],
        next_token_targets(labels=batch["labels"], position_ids=batch["position_ids"]),
    )


def test_a_sample_first_label_is_never_a_target_even_when_trained():
    row = {**PACKED, "labels": PACKED["input_ids"]}  # every token labelled
    targets = collate([row], pad_id=0)["targets"][0].tolist()
    assert targets == [12, 13, X, 22, X, 32, 33, 34, X]


def test_padding_is_a_sample_of_its_own_and_never_a_target():
    batch = collate([PACKED, PLAIN], pad_id=7, pad_to_multiple_of=4)
    assert batch["input_ids"].shape == (2, 12)
    assert batch["position_ids"][0].tolist() == PACKED["position_ids"] + [0, 1, 2]
    assert batch["position_ids"][1].tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6, 7]
    assert batch["input_ids"][1].tolist() == PLAIN["input_ids"] + [7] * 8
    assert (batch["labels"][1, 4:] == X).all()
    assert batch["targets"][1].tolist() == [42, X, 44] + [X] * 9


def test_pad_rows_grows_a_collated_batch_without_changing_its_targets():
    """What the pipeline does for its fixed shape: rows of a collated batch padded further,
    plus empty rows; the targets of the grown batch are the collated ones, padded."""
    batch = collate([PACKED, PLAIN], pad_id=7)
    n, s = batch["input_ids"].shape
    rows = [{k: batch[k][i] for k in ("input_ids", "labels", "position_ids")} for i in range(n)]
    rows.append({"input_ids": (), "labels": ()})
    grown = pad_rows(rows, length=s + 3, pad_id=7)
    targets = next_token_targets(labels=grown["labels"], position_ids=grown["position_ids"])
    assert torch.equal(targets[:n, :s], batch["targets"])
    assert (targets[n:] == X).all() and (targets[:, s:] == X).all()
    assert grown["position_ids"][0, s:].tolist() == [0, 1, 2]
    assert grown["position_ids"][1, 4:].tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
    assert grown["position_ids"][2].tolist() == list(range(s + 3))
    assert (grown["input_ids"][2] == 7).all()
    with pytest.raises(ValueError, match="does not fit"):
        pad_rows(rows, length=s - 1, pad_id=7)


def random_rows(seed: int, n: int = 12) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        lens = rng.integers(1, 9, size=rng.integers(1, 4))
        ids = rng.integers(1, 100, size=int(lens.sum())).astype(np.int32)
        labels = np.where(rng.random(len(ids)) < 0.3, X, ids).astype(np.int32)
        row = {"input_ids": ids, "labels": labels}
        if i % 2:  # packed rows carry position ids; plain rows are one sample each
            row["position_ids"] = np.concatenate([np.arange(k) for k in lens]).astype(np.int32)
        rows.append(row)
    return rows


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_torch_and_numpy_count_the_same_targets(seed):
    rows = random_rows(seed)
    counted = (collate(rows, pad_id=0)["targets"] != X).sum(dim=1).tolist()
    offsets = np.concatenate([[0], np.cumsum([len(r["input_ids"]) for r in rows])])
    labels = np.concatenate([r["labels"] for r in rows])
    plain = target_counts(labels=labels, offsets=offsets)
    assert plain.tolist() == [
        int((r["labels"][1:] != X).sum()) for r in rows
    ]  # without position ids each row is one sample
    packed = [r for r in rows if "position_ids" in r]
    offsets = np.concatenate([[0], np.cumsum([len(r["input_ids"]) for r in packed])])
    got = target_counts(
        labels=np.concatenate([r["labels"] for r in packed]),
        offsets=offsets,
        position_ids=np.concatenate([r["position_ids"] for r in packed]),
    )
    assert got.tolist() == counted[1::2]
    assert plain.tolist()[0::2] == counted[0::2]


def test_row_table_counts_what_collate_targets():
    from datasets import Dataset

    rows = [r for r in random_rows(3) if "position_ids" in r]
    data = Dataset.from_list([{k: v.tolist() for k, v in r.items()} for r in rows])
    table = RowTable(data.select([3, 0, 2]))
    counted = (collate(table.take(range(len(table))), pad_id=0)["targets"] != X).sum(dim=1)
    assert table.target_counts.tolist() == counted.tolist()
    empty = target_counts(labels=np.array([5, 6]), offsets=np.array([0, 0, 2, 2]))
    assert empty.tolist() == [0, 1, 0]


def test_hf_labels_shift_back_to_the_targets():
    rows = [PACKED, PLAIN]
    targets = collate(rows, pad_id=0)["targets"]
    labels = collate_for_hf(rows, pad_id=0)["labels"]
    assert torch.equal(labels, unshifted_labels(targets))
    assert torch.equal(labels[:, 1:], targets[:, :-1])  # the model's own shift
    assert (labels[:, 0] == X).all()
    assert int((labels != X).sum()) == int((targets != X).sum())


def test_summed_cross_entropy_counts_only_targets():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 9, dtype=torch.bfloat16)
    targets = torch.tensor([[1, X, 3, X, X], [X, X, X, 8, 0]])
    got = summed_cross_entropy(logits=logits, targets=targets)
    keep = targets != X
    want = torch.nn.functional.cross_entropy(logits.float()[keep], targets[keep], reduction="sum")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want)
