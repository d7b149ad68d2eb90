"""bench/grpo.py keeps working: TRL's GRPOTrainer, a plain loop and tuneplex each run GRPO on
the tiny model, and the plain-torch stand-in for TRL's Triton log-probabilities is exact."""

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_torch_chunked_logprob_matches_full_logits(monkeypatch, softcap):
    """The stand-in gives what the full logits give (log-probs, entropy and the other outputs,
    and the gradients of hidden, weight and bias), over several chunks."""
    import grpo
    import torch

    monkeypatch.setattr(grpo, "LOGPROB_TOKENS", 7)
    torch.manual_seed(0)
    hidden = torch.randn(20, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(50, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (20,))
    outputs = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
    got = grpo.TorchChunkedLogProb.apply(
        hidden, weight, bias, targets, 0.7, 32768, softcap, 1.5, outputs
    )

    z = (hidden @ weight.t() + bias) * 1.5
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z = z / 0.7
    log_p = z.log_softmax(-1)
    want = (
        log_p.gather(-1, targets[:, None])[:, 0],
        -(log_p.exp() * log_p).sum(-1),
        (2 * log_p).exp().sum(-1).log(),
        z.mean(-1),
        z.argmax(-1) == targets,
    )
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape and torch.allclose(a.double(), b.double(), atol=1e-10)
    weights = torch.arange(20, dtype=torch.float64)
    grads = [
        torch.autograd.grad((lp * weights).sum() + ent.sum(), (hidden, weight, bias))
        for lp, ent in ((got[0], got[1]), (want[0], want[1]))
    ]
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b, atol=1e-10)
    only = grpo.TorchChunkedLogProb.apply(
        hidden, weight, None, targets, 1.0, 32768, None, 1.0, ("log_probs",)
    )
    assert only[1:] == (None, None, None, None) and only[0].shape == (20,)


@pytest.mark.slow
def test_grpo_bench_tiny(tmp_path, capsys):
    """Every contender trains 1 + 2 steps (LoRA; full weights take the same code); each row
    has its speed, its time split, its peak memory and a reward per step; TRL renders
    tuneplex's prompt ids."""
    import grpo

    out = tmp_path / "out.json"
    args = ["--shape", "tiny", "--steps", "2", "--warmup", "1", "--setup", "lora"]
    args += ["--contenders", "trl,loop,tuneplex", "--threads", "1"]
    results = grpo.main([*args, "--workdir", str(tmp_path), "--json", str(out)])
    assert json.loads(out.read_text())["results"] == results
    assert [(r["setup"], r["contender"]) for r in results] == [
        ("lora", c) for c in ("trl", "loop", "tuneplex")
    ]
    for r in results:
        assert "error" not in r, r
        assert r["steps_per_s"] > 0 and r["peak_rss_gib"] > 0 and r["wall_s"] > 0
        parts = r["generation_s"] + r["reward_s"] + r["training_s"]
        assert 0 < parts <= r["step_s"] * 1.01 and r["generation_s"] > 0 and r["training_s"] > 0
        assert len(r["rewards"]) == 3 and all(0 <= x <= 1 for x in r["rewards"])
        assert 0 < r["completion_tokens"] <= 8
        assert r["speed_vs_trl"] > 0 and (r["contender"] != "trl" or r["speed_vs_trl"] == 1.0)
    assert all(r["prompts_match"] for r in results if r["contender"] == "trl")
    table = capsys.readouterr().out
    assert "| speed ÷ TRL |" in table and "python bench/grpo.py --shape tiny" in table
    assert table.count("| tuneplex | fp32 |") == 1 and "failed" not in table
