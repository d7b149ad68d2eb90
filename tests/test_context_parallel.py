"""Context parallelism on CPU (gloo, 2 real processes) equals one process.

The same batch (one packed row, one right-padded row, an odd length) goes through the model
once whole, and once split over two ranks with `parallel.cp`; the ranks' losses and
parameter gradients, summed over the group, must be the one-process values. Run as a script
(by `start_ranks`), this file is one rank's worker.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from helpers import build_family, rank_main, start_ranks  # noqa: E402
from tuneplex.data.collate import collate  # noqa: E402
from tuneplex.data.targets import IGNORE_INDEX  # noqa: E402
from tuneplex.errors import UsageError  # noqa: E402
from tuneplex.nn.evaluation import loss_sum as full_loss_sum  # noqa: E402
from tuneplex_automodel.parallel import cp  # noqa: E402

nn = torch.nn
WORLD = 2
CASES = {  # case name -> (model fixture key, LoRA?)
    "llama": ("llama", False),
    "llama-lora": ("llama", True),
    "qwen3-sliding": ("qwen3", False),  # q/k norms, one sliding-window layer (window 5)
    "qwen3-moe": ("qwen3_moe", False),
}
A_LEN, B_LEN, C_LEN = 11, 12, 15  # row 0 packs samples A and B (23 tokens), row 1 is C + 8 pad


def make_batch(tok) -> dict:
    """Two rows of real token ids: [A | B] packed, and C right-padded; 23 tokens, odd."""
    from tuneplex.testing.tiny import WORDS

    def ids(start: int, n: int) -> list[int]:
        text = " ".join(WORDS[start : start + 3 * n])
        out = tok(text, add_special_tokens=False)["input_ids"][:n]
        assert len(out) == n
        return out

    a, b, c = ids(0, A_LEN), ids(7, B_LEN), ids(20, C_LEN)
    rows = [
        {
            "input_ids": a + b,
            "labels": [IGNORE_INDEX] * 3 + a[3:] + [IGNORE_INDEX] * 2 + b[2:],
            "position_ids": list(range(A_LEN)) + list(range(B_LEN)),
        },
        {"input_ids": c, "labels": c},
    ]
    return collate(rows, pad_id=tok.pad_token_id)


def block_causal(lengths: list[list[int]], total: int) -> torch.Tensor:
    """The (rows, 1, total, total) mask written out by hand from each row's block lengths."""
    mask = torch.zeros(len(lengths), 1, total, total, dtype=torch.bool)
    for r, blocks in enumerate(lengths):
        assert sum(blocks) == total
        start = 0
        for n in blocks:
            for i in range(start, start + n):
                for j in range(start, i + 1):
                    mask[r, 0, i, j] = True
            start += n
    return mask


def load(path: str, *, lora: bool):
    from tuneplex_automodel.model import apply_lora

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if lora:
        model = apply_lora(model, rank=8, alpha=16, target_modules=None)
        # lora_B starts at zero, which would make every lora_A gradient zero: give all adapter
        # weights the same non-zero values in every process.
        gen = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for _, p in sorted(model.named_parameters()):
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    model.train()
    return model


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


# --- the worker (one rank) -------------------------------------------------------------------


def worker(rank: int, spec_path: str) -> None:
    import torch.distributed as dist

    spec = json.loads(Path(spec_path).read_text())
    batch = torch.load(spec["batch"])
    results = {"gather": gather_check(rank)}
    for case, path in spec["cases"].items():
        model = load(path, lora=CASES[case][1])
        cp.enable(model, group=None)
        loss = cp.loss_sum(model, batch, rank=rank, size=WORLD, pad_id=spec["pad_id"])
        loss.backward()
        dist.all_reduce(loss := loss.detach())
        summed = grads(model)
        for g in summed.values():
            dist.all_reduce(g)
        with torch.no_grad():  # an unsharded call on the enabled model: plain attention
            whole = full_loss_sum(model, batch)
        results[case] = {"loss": loss, "grads": summed, "whole": whole}
    if rank == 0:
        torch.save(results, spec["out"])
    dist.barrier()


def gather_check(rank: int) -> dict:
    """The sequence all-gather and its gradient, with the all-reduce backward (gloo) and the
    reduce-scatter one (NCCL), against every rank's input and the sum of their gradients."""

    def seeded(seed: int, seq: int) -> torch.Tensor:
        return torch.randn(2, 3, seq, 5, generator=torch.Generator().manual_seed(seed))

    inputs = [seeded(r, 4) for r in range(WORLD)]
    upstream = [seeded(10 + r, 4 * WORLD) for r in range(WORLD)]
    out = {"expected": sum(upstream)[:, :, rank * 4 : (rank + 1) * 4]}
    for scatter in (False, True):
        x = inputs[rank].clone().requires_grad_()
        try:
            y = cp._gather_function().apply(x, None, scatter)
            (y * upstream[rank]).sum().backward()
        except RuntimeError as exc:  # an old gloo without reduce_scatter
            out[scatter] = str(exc)
            continue
        out[scatter] = (torch.equal(y, torch.cat(inputs, dim=2)), x.grad.clone())
    return out


# --- the tests ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tiny_model, tokenizers, tmp_path_factory) -> dict[str, str]:
    """The conftest Llama, and a tiny Qwen3 and Qwen3-MoE saved next to it."""
    from tuneplex.testing.tiny import build_moe

    root = tmp_path_factory.mktemp("cp-models")
    tok = tokenizers["chatml"][1]
    qwen3 = build_family(
        "Qwen3ForCausalLM", tok, use_sliding_window=True, sliding_window=5, max_window_layers=1
    )
    assert qwen3.config.layer_types == ["full_attention", "sliding_attention"]
    qwen3.save_pretrained(root / "qwen3")
    paths = {"llama": tiny_model, "qwen3": str(root / "qwen3")}
    build_moe(root / "qwen3_moe", tokenizer=tok, moe_intermediate=32, init_std=0.1)
    paths["qwen3_moe"] = str(root / "qwen3_moe")
    return paths


@pytest.fixture(scope="module")
def batch(tokenizers):
    return make_batch(tokenizers["chatml"][1])


@pytest.fixture(scope="module")
def ranks(models, batch, tokenizers, tmp_path_factory) -> dict:
    """Run both ranks once over every case: {case: summed loss, summed grads, whole loss}."""
    root = tmp_path_factory.mktemp("cp-run")
    torch.save(batch, root / "batch.pt")
    spec = {
        "batch": str(root / "batch.pt"),
        "pad_id": tokenizers["chatml"][1].pad_token_id,
        "cases": {case: models[key] for case, (key, _) in CASES.items()},
        "out": str(root / "out.pt"),
    }
    (root / "spec.json").write_text(json.dumps(spec))
    start_ranks(script=__file__, args=[str(root / "spec.json")], world=WORLD, threads=2)
    return torch.load(root / "out.pt")


@pytest.fixture(scope="module")
def reference(models, batch) -> dict:
    """One process, the whole batch, the model's own mask from the position ids."""
    out = {}
    for case, (key, lora) in CASES.items():
        model = load(models[key], lora=lora)
        loss = full_loss_sum(model, batch)
        loss.backward()
        out[case] = {"loss": loss.detach(), "grads": grads(model)}
    return out


@pytest.mark.slow  # worker processes
@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_equal_one_process(case, ranks, reference):
    got, want = ranks[case], reference[case]
    assert want["loss"] > 0
    assert torch.allclose(got["loss"], want["loss"], rtol=1e-5, atol=0), (got["loss"], want)
    assert got["grads"].keys() == want["grads"].keys()
    assert len(want["grads"]) > 0
    for name, g in want["grads"].items():
        assert g.abs().max() > 0, f"{name}: zero reference gradient"
        # The same fp32 sums taken in another order (per shard, then all-reduced): errors of a
        # few eps times the tensor's scale, ~1e-7 of its largest entry; a leak across samples
        # or shards moves gradients by ~1e-2 of it.
        scale = g.abs().max().item()
        torch.testing.assert_close(
            got["grads"][name], g, rtol=1e-5, atol=1e-5 * scale, msg=lambda m, n=name: f"{n}: {m}"
        )


@pytest.mark.slow  # worker processes
@pytest.mark.parametrize("case", list(CASES))
def test_unsharded_call_after_enable_is_plain_attention(case, ranks, reference):
    """Evaluation on whole rows (no shard mask) still builds the model's own SDPA mask."""
    assert torch.allclose(ranks[case]["whole"], reference[case]["loss"], rtol=1e-6, atol=0)


@pytest.mark.slow  # worker processes
def test_gather_gradient_sums_every_rank(ranks):
    check = ranks["gather"]
    gathered_ok, grad = check[False]
    assert gathered_ok
    torch.testing.assert_close(grad, check["expected"], rtol=1e-6, atol=1e-6)
    if isinstance(check[True], str):
        pytest.skip(f"this gloo has no reduce_scatter: {check[True]}")
    gathered_ok, grad = check[True]
    assert gathered_ok
    torch.testing.assert_close(grad, check["expected"], rtol=1e-6, atol=1e-6)


def test_shard_of_one_is_the_block_causal_mask(batch):
    shard = cp.shard_batch(batch, rank=0, size=1, pad_id=0)
    for key in ("input_ids", "position_ids", "targets", "labels"):
        assert torch.equal(shard[key], batch[key]), key
    total = A_LEN + B_LEN
    want = block_causal([[A_LEN, B_LEN], [C_LEN, total - C_LEN]], total)
    assert shard["attention_mask"].dtype == torch.bool
    assert torch.equal(shard["attention_mask"], want)


@pytest.mark.parametrize("size", [2, 3, 5])
def test_shards_tile_the_padded_rows(batch, size):
    pad_id = 99
    total = A_LEN + B_LEN
    padded = -(-total // size) * size
    extra = padded - total
    shards = [cp.shard_batch(batch, rank=r, size=size, pad_id=pad_id) for r in range(size)]
    for s in shards:
        assert s["input_ids"].shape == (2, padded // size)
        assert s["attention_mask"].shape == (2, 1, padded // size, padded)

    def cat(key):
        return torch.cat([s[key] for s in shards], dim=-2 if key == "attention_mask" else -1)

    ids, pos, targets = cat("input_ids"), cat("position_ids"), cat("targets")
    assert torch.equal(ids[:, :total], batch["input_ids"])
    assert (ids[:, total:] == pad_id).all()
    assert torch.equal(targets[:, :total], batch["targets"])
    assert (targets[:, total:] == IGNORE_INDEX).all()
    assert (cat("labels")[:, total:] == IGNORE_INDEX).all()
    # The padding continues each row's last block: sample B, and the collate padding tail.
    assert pos[0, total:].tolist() == list(range(B_LEN, B_LEN + extra))
    tail = total - C_LEN
    assert pos[1, total:].tolist() == list(range(tail, tail + extra))
    want = block_causal([[A_LEN, B_LEN + extra], [C_LEN, tail + extra]], padded)
    assert torch.equal(cat("attention_mask"), want)
    assert cat("attention_mask").diagonal(dim1=-2, dim2=-1).all()  # no empty softmax row


def test_enable_refuses_a_model_without_attention_interface():
    with pytest.raises(UsageError) as err:
        cp.enable(nn.Linear(2, 2), group=None)
    assert err.value.lines() == [
        "parallelism.context_parallel_size: Linear has no SDPA attention to run sharded"
    ]
    with pytest.raises(UsageError) as err:
        cp.enable(FixedModel(FixedConfig()), group=None)
    (line,) = err.value.lines()
    assert line.startswith(
        "parallelism.context_parallel_size: FixedModel cannot run its attention through a custom"
    )


class FixedConfig(transformers.PretrainedConfig):
    model_type = "tuneplex_fixed_attention"


class FixedAttention(nn.Module):
    """Attention that always runs its own code: it cannot be switched to the CP function."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)


class FixedModel(transformers.PreTrainedModel):
    config_class = FixedConfig
    _supports_sdpa = True

    def __init__(self, config):
        super().__init__(config)
        self.attn = FixedAttention()
        self.post_init()


if __name__ == "__main__":
    rank_main(lambda rank: worker(rank, sys.argv[1]))
