"""The training plan: steps, micro-batches, learning rate, validation and checkpoint points."""

from __future__ import annotations

import itertools
import math

import pytest
from tuneplex_automodel.plan import MIN_LR_RATIO, TrainPlan, learning_rate


def plan(**kw) -> TrainPlan:
    base = dict(
        n_rows=10,
        global_batch=4,
        micro_batch=2,
        epochs=2,
        max_steps=None,
        seed=1,
        val_check_interval=None,
        checkpoint_steps=None,
    )
    return TrainPlan(**{**base, **kw})


def test_last_step_of_an_epoch_takes_the_leftover_rows():
    p = plan()
    assert p.steps_per_epoch == 3 and p.total_steps == 6
    steps = p.epoch_steps(0)
    assert [sum(len(m) for m in s) for s in steps] == [4, 4, 2]
    assert all(len(m) <= 2 for s in steps for m in s)
    rows = [r for s in steps for m in s for r in m]
    assert sorted(rows) == list(range(10))  # every row exactly once per epoch


def test_order_is_seeded_per_epoch_and_reproducible():
    p = plan()
    assert p.epoch_steps(0) == plan().epoch_steps(0)
    assert p.epoch_steps(0) != p.epoch_steps(1)
    assert plan(seed=2).epoch_steps(0) != p.epoch_steps(0)


@pytest.mark.parametrize("dp", [2, 4])
def test_data_parallel_ranks_split_each_step(dp):
    p = plan(n_rows=37, global_batch=8, micro_batch=2, dp_size=dp)
    per_rank = [p.epoch_steps(0, dp_rank=r) for r in range(dp)]
    for i, whole in enumerate(p.step_rows(0)):
        got = sorted(r for rank in per_rank for m in rank[i] for r in m)
        assert got == sorted(whole)
        assert len({len(rank[i]) for rank in per_rank}) == 1  # same micro-steps on every rank


def test_max_steps_caps_the_run():
    assert plan(max_steps=4).total_steps == 4
    assert plan(max_steps=4).unreached_cap() is None
    assert plan(max_steps=100).total_steps == 6
    assert plan(max_steps=100).unreached_cap() == (
        "max_steps 100 > 2 epochs × 3 steps: stopping after 6; raise schedule.epochs"
    )
    assert plan(max_steps=60, epochs=1).unreached_cap() == (
        "max_steps 60 > 1 epoch × 3 steps: stopping after 3; raise schedule.epochs"
    )


def test_learning_rate_warmup_then_cosine_to_ten_percent():
    kw = dict(peak=1.0, warmup_steps=4, total_steps=20)
    assert [learning_rate(s, **kw) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert learning_rate(4, **kw) == 1.0
    assert math.isclose(learning_rate(19, **kw), MIN_LR_RATIO)
    decay = [learning_rate(s, **kw) for s in range(4, 20)]
    assert all(a >= b for a, b in itertools.pairwise(decay))
    assert learning_rate(0, peak=2.0, warmup_steps=0, total_steps=1) == 2.0


@pytest.mark.parametrize(
    ("interval", "spe", "expected"),
    [
        (0.5, 10, {5, 10}),
        (0.5, 5, {3, 5}),
        (0.25, 8, {2, 4, 6, 8}),
        (0.3, 10, {3, 6, 9}),
        (1.0, 7, {7}),
    ],
)
def test_validation_points(interval, spe, expected):
    p = plan(n_rows=spe * 4, epochs=2, val_check_interval=interval)
    assert p.steps_per_epoch == spe
    got = {s for s in range(1, spe + 1) if p.validate_after(s)}
    assert got == expected
    assert p.validate_after(p.total_steps)


def test_checkpoint_points():
    assert [s for s in range(1, 7) if plan().checkpoint_after(s)] == [3, 6]
    assert [s for s in range(1, 7) if plan(checkpoint_steps=4).checkpoint_after(s)] == [4, 6]
