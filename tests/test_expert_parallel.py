"""Expert parallelism on CPU (gloo, 2 processes) equals one process.

Two real worker processes (this file run as a script) each read their own batch through a tiny
Qwen3-MoE and Mixtral whose 4 experts are split 2 + 2 over the ranks, and measure themselves
against the full model run in one process on both batches: per-rank loss, gradients, the full
state dict gathered from the shards and a load back into them. The pytest side asserts on
those measurements.

Tolerances: everything is fp32 and the arithmetic is the same, but sums run in another order
(the reference's experts sum over all tokens at once, EP's over each rank's, and EP's
non-expert gradients are an all-reduce of two backwards), so results differ by a few fp32 ulps:
measured, losses equal bitwise and gradients within 1.5e-6 of values up to ~10 (2e-7
relative). The bound, 1e-5 relative to the largest gradient, sits ~50x above that; a
mis-routed token, a wrong shard or a dropped gradient moves them by 1e-3 or more.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from helpers import rank_main, start_ranks  # noqa: E402

FAMILIES = ("qwen3_moe", "mixtral")
CASES = [f"{f}-{ft}" for f in FAMILIES for ft in ("full", "lora")]
EXPERT_SUFFIXES = (".experts.gate_up_proj", ".experts.down_proj")
TOL = 1e-5


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizers):
    from tuneplex.testing.tiny import build_moe

    root = tmp_path_factory.mktemp("moe")
    tok = tokenizers["chatml"][1]
    # init_std 0.1: router logits spread enough that fp32 noise cannot flip a top-2 choice
    build_moe(root / "qwen3_moe", tokenizer=tok, init_std=0.1)
    build_moe(root / "mixtral", family="mixtral", tokenizer=tok, init_std=0.1)
    return {f: str(root / f) for f in FAMILIES}


@pytest.fixture(scope="module")
def ep_runs(models, tmp_path_factory):
    """Both ranks' measurements: [rank0, rank1], each {case: {...}}."""
    out = tmp_path_factory.mktemp("ep-out")
    start_ranks(script=__file__, args=[json.dumps(models), str(out)], world=2)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.slow  # worker processes
@pytest.mark.parametrize("case", CASES)
def test_loss_and_gradients_equal_one_process(ep_runs, case):
    for rank, run in enumerate(ep_runs):
        m = run[case]
        # tokens of this rank went to experts on both ranks, in every layer
        assert min(m["routed_to"]) > 0, m["routed_to"]
        assert abs(m["loss"] - m["ref_loss"]) <= TOL * abs(m["ref_loss"]), (rank, m)
        assert m["missing_grads"] == [], m  # every parameter the reference trains got one
        assert m["non_expert_grads"] > 0
        assert m["grad_max_diff"] <= TOL * max(1.0, m["grad_max"]), (rank, m)
        if case.endswith("lora"):
            assert m["trained"] == "lora", m  # only adapters train; expert weights stay frozen
            assert m["expert_grads"] == 0
            # peft 0.21's "all-linear" puts adapters on the fused experts too (2 layers × 2 × A,
            # B), as v4's did on every expert Linear; each must train
            assert m["expert_lora_grads"] == m["expert_lora_params"] in (0, 8), m
            assert m["loss_vs_base"] > 1e-3  # the (perturbed) adapters change the loss
        else:
            assert m["expert_grads"] == 4  # 2 layers × (gate_up, down)
            assert m["expert_grad_max"] > 1e-3
            assert m["expert_grad_max_diff"] <= TOL * max(1.0, m["expert_grad_max"]), (rank, m)


@pytest.mark.slow  # worker processes
@pytest.mark.parametrize("case", CASES)
def test_state_dict_gathers_and_scatters_the_shards(ep_runs, case):
    for run in ep_runs:
        m = run[case]
        assert m["local_expert_shape"][0] == 2  # half of the 4 experts, names unchanged
        assert m["full_keys_equal"], m.get("key_diff")
        assert m["full_max_diff"] == 0.0  # gathered shards are the original bytes
        assert m["reloaded_max_diff"] == 0.0  # zeroed shards came back from the full dict
        assert abs(m["reloaded_loss"] - m["ref_loss"]) <= TOL * abs(m["ref_loss"])


@pytest.mark.slow  # worker processes
@pytest.mark.parametrize("scenario", ["one_sided", "one_rank_empty"])
def test_uneven_and_empty_routing(ep_runs, scenario):
    """All tokens to rank 0's experts, and a rank with no tokens at all: the collectives still
    match up and every local expert gets a gradient (zeros where nothing reached it)."""
    for rank, run in enumerate(ep_runs):
        m = run["edge"][scenario]
        assert m["out_max_diff"] <= TOL, (rank, m)
        assert m["input_grad_max_diff"] <= TOL, (rank, m)
        assert m["grads_present"], (rank, m)
        assert m["weight_grad_max_diff"] <= TOL * max(1.0, m["weight_grad_max"]), (rank, m)
    assert ep_runs[1]["edge"]["one_sided"]["weight_grad_max"] == 0.0  # rank 1's experts idle
    assert ep_runs[0]["edge"]["one_sided"]["weight_grad_max"] > 1e-3


def test_check_divides_refuses_a_size_that_does_not_split_the_experts(models):
    from transformers import AutoModelForCausalLM
    from tuneplex.errors import UsageError
    from tuneplex_automodel.parallel.ep import check_divides, expert_parameters, moe_experts

    model = AutoModelForCausalLM.from_pretrained(models["qwen3_moe"])
    assert [n for n, _ in moe_experts(model)] == [f"model.layers.{i}.mlp.experts" for i in (0, 1)]
    assert len(expert_parameters(model)) == 4
    for ep in (1, 2, 4):
        check_divides(model, ep=ep)
    with pytest.raises(UsageError) as err:
        check_divides(model, ep=3)
    assert err.value.lines() == [
        "parallelism.expert_parallel_size: 3 does not divide the 4 experts of "
        "Qwen3MoeForCausalLM; valid sizes: 1, 2, 4"
    ]


def test_check_divides_refuses_a_dense_model(tiny_model, models):
    from transformers import AutoModelForCausalLM
    from tuneplex.errors import UsageError
    from tuneplex_automodel.model import apply_lora
    from tuneplex_automodel.parallel.ep import check_divides, moe_experts

    dense = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert moe_experts(dense) == []
    check_divides(dense, ep=1)
    with pytest.raises(UsageError) as err:
        check_divides(dense, ep=2)
    (line,) = err.value.lines()
    assert line.startswith(
        "parallelism.expert_parallel_size: LlamaForCausalLM is not a mixture-of-experts model"
    )
    # through a peft wrapper: the experts are still found, and named by the base class
    peft = apply_lora(
        AutoModelForCausalLM.from_pretrained(models["mixtral"]),
        rank=8,
        alpha=16,
        target_modules=None,
    )
    assert len(moe_experts(peft)) == 2
    with pytest.raises(UsageError, match="3 does not divide the 4 experts of MixtralForCausalLM"):
        check_divides(peft, ep=3)


# ----------------------------------------------------------------------------------------------
# The worker: `python test_expert_parallel.py MODELS_JSON OUT_DIR`, one rank of `start_ranks`;
# writes OUT_DIR/rank{RANK}.json.


def _batches():
    """Two ragged batches of random token ids (one per rank), collated as the trainer does."""
    from tuneplex.data.collate import collate

    g = torch.Generator().manual_seed(1234)
    out = []
    for lengths in ((12, 9), (11, 12)):
        rows = []
        for n in lengths:
            ids = torch.randint(10, 500, (n,), generator=g).tolist()
            rows.append({"input_ids": ids, "labels": ids})
        b = collate(rows, pad_id=0)
        out.append({k: b[k] for k in ("input_ids", "position_ids", "targets")})
    return out


def _load(path: str, *, lora: bool, like=None):
    from transformers import AutoModelForCausalLM
    from tuneplex_automodel.model import apply_lora

    model = AutoModelForCausalLM.from_pretrained(path)
    if lora:
        torch.manual_seed(0)  # the same adapter init on every rank, as the trainer seeds it
        model = apply_lora(model, rank=8, alpha=16, target_modules=None)
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():  # B starts at zero; perturb it so A gets gradients too
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    if like is not None:
        model.load_state_dict(like.state_dict())
    return model


def _is_expert(name: str) -> bool:
    return name.endswith(EXPERT_SUFFIXES)


def _case(path: str, *, lora: bool, batches, mesh) -> dict:
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        set_model_state_dict,
    )
    from torch.distributed.tensor import DTensor
    from tuneplex.nn.evaluation import loss_sum
    from tuneplex_automodel.parallel.ep import expert_parallel, expert_parameters, moe_experts

    rank = mesh.get_local_rank()
    ref = _load(path, lora=lora)
    original = {k: v.clone() for k, v in ref.state_dict().items()}
    ref_losses = [loss_sum(ref, b) for b in batches]
    sum(ref_losses).backward()
    ref_grads = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}

    model = _load(path, lora=lora, like=ref)
    expert_parallel(model, mesh=mesh)
    routed_to = []
    for _, mod in moe_experts(model):  # count this rank's assignments per destination rank
        mod.register_forward_pre_hook(
            lambda m, args: routed_to.extend(torch.bincount(args[1].flatten() // 2, minlength=2))
        )
    loss = loss_sum(model, batches[rank])
    loss.backward()
    m: dict = {"loss": loss.item(), "ref_loss": ref_losses[rank].item()}
    m["routed_to"] = [int(c) for c in routed_to]

    diffs, expert_diffs, n_plain, n_expert = [0.0], [0.0], 0, 0
    trained, missing = set(), []
    for name, p in model.named_parameters():
        if p.grad is None:
            if name in ref_grads:
                missing.append(name)
            continue
        trained.add("lora" if "lora_" in name else "expert" if _is_expert(name) else "base")
        if isinstance(p, DTensor):
            assert _is_expert(name) and isinstance(p.grad, DTensor), name
            n = p.to_local().shape[0]
            want = ref_grads[name][rank * n : (rank + 1) * n]
            expert_diffs.append((p.grad.to_local() - want).abs().max().item())
            n_expert += 1
        else:
            g = p.grad.clone()
            dist.all_reduce(g)
            diffs.append((g - ref_grads[name]).abs().max().item())
            n_plain += 1
    m["trained"], m["missing_grads"] = "+".join(sorted(trained)), missing
    expert_lora = [p for n, p in model.named_parameters() if ".experts." in n and "lora_" in n]
    m["expert_lora_params"] = len(expert_lora)
    m["expert_lora_grads"] = sum(p.grad is not None and bool(p.grad.any()) for p in expert_lora)
    m["non_expert_grads"], m["expert_grads"] = n_plain, n_expert
    m["grad_max_diff"], m["expert_grad_max_diff"] = max(diffs), max(expert_diffs)
    m["grad_max"] = max(g.abs().max().item() for n, g in ref_grads.items() if not _is_expert(n))
    m["expert_grad_max"] = max(
        (g.abs().max().item() for n, g in ref_grads.items() if _is_expert(n)), default=0.0
    )
    if lora:
        base = _load(path, lora=False)
        m["loss_vs_base"] = abs(loss_sum(base, batches[rank]).item() - m["loss"])

    # full state dict gathered from the shards, then loaded back into zeroed shards
    experts = expert_parameters(model)
    m["local_expert_shape"] = list(experts[0].to_local().shape)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    m["full_keys_equal"] = set(full) == set(original)
    m["key_diff"] = sorted(set(full) ^ set(original))[:6]
    m["full_max_diff"] = max(
        (full[k] - original[k]).abs().max().item() for k in set(full) & set(original)
    )
    with torch.no_grad():
        for p in experts:
            p.to_local().zero_()
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True))
    reloaded = dict(model.named_parameters())
    m["reloaded_max_diff"] = 0.0
    for name, p in reloaded.items():
        if _is_expert(name):
            assert isinstance(p, DTensor), name
            n = p.to_local().shape[0]
            want = original[name][rank * n : (rank + 1) * n]
            d = (p.to_local() - want).abs().max().item()
            m["reloaded_max_diff"] = max(m["reloaded_max_diff"], d)
    with torch.no_grad():
        m["reloaded_loss"] = loss_sum(model, batches[rank]).item()
    return m


def _edge(path: str, *, mesh) -> dict:
    """The experts module alone, fed routing that leaves ranks or experts without tokens."""
    import copy

    from transformers import AutoModelForCausalLM
    from tuneplex_automodel.parallel.ep import expert_parallel, moe_experts

    rank = mesh.get_local_rank()
    base = AutoModelForCausalLM.from_pretrained(path)
    out = {}
    g = torch.Generator().manual_seed(99)
    h = [torch.randn(7, 64, generator=g), torch.randn(5, 64, generator=g)]
    w = [torch.rand(7, 2, generator=g), torch.rand(5, 2, generator=g)]
    scenarios = {
        "one_sided": ([torch.tensor([[0, 1]] * 7), torch.tensor([[1, 0]] * 5)], (7, 5)),
        "one_rank_empty": ([torch.tensor([[3, 0]] * 7), torch.tensor([[0, 1]] * 5)], (7, 0)),
    }
    for name, (idx, sizes) in scenarios.items():
        idx = [i[:s] for i, s in zip(idx, sizes, strict=True)]
        hs = [x[:s].clone().requires_grad_() for x, s in zip(h, sizes, strict=True)]
        ws = [x[:s] for x, s in zip(w, sizes, strict=True)]
        ref = copy.deepcopy(moe_experts(base)[0][1])
        want = ref(torch.cat(hs), torch.cat(idx), torch.cat(ws))
        want.sum().backward()

        holder = copy.deepcopy(base.model.layers[0].mlp)
        expert_parallel(holder, mesh=mesh)
        mine = holder.experts
        x = hs[rank].detach().clone().requires_grad_()
        got = mine(x, idx[rank], ws[rank])
        got.sum().backward()
        lo = sum(sizes[:rank])
        n = mine.gate_up_proj.to_local().shape[0]
        grads = [mine.gate_up_proj.grad, mine.down_proj.grad]
        m = {"grads_present": all(gr is not None for gr in grads)}
        m["out_max_diff"] = (
            (got - want[lo : lo + sizes[rank]]).abs().max().item() if sizes[rank] else 0.0
        )
        m["input_grad_max_diff"] = (
            (x.grad - hs[rank].grad).abs().max().item() if sizes[rank] else 0.0
        )
        m["weight_grad_max_diff"] = max(
            (
                (gr.to_local() - full.grad[rank * n : (rank + 1) * n]).abs().max().item()
                for gr, full in zip(grads, (ref.gate_up_proj, ref.down_proj), strict=True)
                if gr is not None
            ),
            default=0.0,
        )
        m["weight_grad_max"] = max(
            (gr.to_local().abs().max().item() for gr in grads if gr is not None), default=0.0
        )
        out[name] = m
    return out


def _worker(rank: int, models: dict[str, str], out_dir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("ep",))
    batches = _batches()
    result = {}
    for family, path in models.items():
        for ft in ("full", "lora"):
            result[f"{family}-{ft}"] = _case(path, lora=ft == "lora", batches=batches, mesh=mesh)
    result["edge"] = _edge(models["qwen3_moe"], mesh=mesh)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    torch.set_num_threads(1)
    rank_main(lambda rank: _worker(rank, json.loads(sys.argv[1]), sys.argv[2]))
