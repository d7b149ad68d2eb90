"""Sampling each completion on its own (`RowSampler`): the right distribution, the job's top-k
and top-p, and a row's tokens independent of the rows that share its batch — what lets two
data-parallel ranks sample exactly what one process samples."""

import math

import pytest

torch = pytest.importorskip("torch")

from tuneplex.inference.engine import RowSampler, Sampling, counter_uniform  # noqa: E402


def draw(logits, seeds, **sampling):
    out = RowSampler(seeds, Sampling(**sampling))(None, logits)
    assert torch.isneginf(out).sum(-1).eq(logits.shape[-1] - 1).all()  # one token left a row
    return out.argmax(-1)


def test_counter_uniform_is_uniform_and_a_function_of_seed_and_count():
    xs = [counter_uniform(7, n) for n in range(50_000)]
    assert min(xs) >= 0 and max(xs) < 1
    assert abs(sum(xs) / len(xs) - 0.5) < 0.01
    assert counter_uniform(7, 3) == counter_uniform(7, 3) != counter_uniform(8, 3)


def test_draws_follow_the_distribution():
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    n = 20_000
    picked = draw(probs.log().repeat(n, 1), list(range(n)), temperature=1.0)
    share = torch.bincount(picked, minlength=4) / n
    assert torch.allclose(share, probs, atol=0.015), share


def test_temperature_top_k_and_top_p():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).repeat(5000, 1)
    seeds = list(range(5000))
    assert set(draw(logits, seeds, temperature=1.0, top_k=2).tolist()) == {0, 1}
    # top-p 0.7: the smallest set whose probability reaches 0.7 (tokens 0 and 1: 0.64, 0.88)
    assert set(draw(logits, seeds, temperature=1.0, top_p=0.7).tolist()) == {0, 1}
    cold = draw(logits, seeds, temperature=0.05)
    assert (cold == 0).float().mean() > 0.99


def test_a_row_draws_the_same_tokens_in_any_batch():
    """Row i with seed s gives the same token whatever rows surround it, over many steps."""
    torch.manual_seed(0)
    logits = torch.randn(6, 8, 50)  # rows, steps, vocabulary
    seeds = [11, 12, 13, 14, 15, 16]
    together = RowSampler(seeds, Sampling(temperature=1.0))
    alone = [RowSampler([s], Sampling(temperature=1.0)) for s in seeds[3:]]
    for step in range(8):
        both = together(None, logits[:, step]).argmax(-1)
        apart = [a(None, logits[3 + k, step : step + 1]).argmax(-1) for k, a in enumerate(alone)]
        assert both[3:].tolist() == [int(x) for x in apart]


def test_log_probs_are_the_temperature_scaled_ones():
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    sampler = RowSampler([5], Sampling(temperature=0.5), log_probs=True)
    token = int(sampler(None, logits).argmax(-1))
    expected = (logits / 0.5).log_softmax(-1)[0, token].item()
    assert math.isclose(sampler.row_log_probs(0)[0], expected, rel_tol=1e-6)
