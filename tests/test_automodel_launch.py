"""Rendezvous settings for multi-node launches (no processes started)."""

import pytest
from tuneplex.errors import UsageError
from tuneplex_automodel.launch import expand_nodelist, rendezvous
from tuneplex_automodel.parallel_dims import ParallelDims


def dims(nodes=2, gpus=8):
    return ParallelDims(
        nodes, gpus, 1, 1, 1, 1, global_batch_size=16 * nodes * gpus, micro_batch_size=1
    )


@pytest.mark.parametrize(
    ("nodelist", "hosts"),
    [
        ("gpu[01-03,07]", ["gpu01", "gpu02", "gpu03", "gpu07"]),
        ("a,b", ["a", "b"]),
        ("n[8-10],login", ["n8", "n9", "n10", "login"]),
    ],
)
def test_slurm_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


def test_flags_give_a_static_rendezvous():
    env = {
        "TUNEPLEX_NODE_RANK": "1",
        "TUNEPLEX_MASTER_ADDR": "10.0.0.1",
        "TUNEPLEX_MASTER_PORT": "1234",
    }
    assert rendezvous(dims(), env) == {
        "backend": "static",
        "endpoint": "10.0.0.1:1234",
        "node_rank": 1,
    }


def test_slurm_variables():
    env = {"SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "gpu[3-4]"}
    assert rendezvous(dims(), env) == {
        "backend": "static",
        "endpoint": "gpu3:29500",
        "node_rank": 0,
    }


def test_c10d_endpoint_wins():
    env = {"TUNEPLEX_RDZV_ENDPOINT": "head:29400", "TUNEPLEX_NODE_RANK": "3"}
    assert rendezvous(dims(4), env)["backend"] == "c10d"


def test_single_node_needs_nothing():
    r = rendezvous(dims(1, 2), {})
    assert (
        r["backend"] == "static" and r["endpoint"].startswith("127.0.0.1:") and r["node_rank"] == 0
    )


def test_node_rank_out_of_range():
    env = {"TUNEPLEX_NODE_RANK": "2", "TUNEPLEX_MASTER_ADDR": "h"}
    with pytest.raises(UsageError) as exc:
        rendezvous(dims(), env)
    assert exc.value.lines() == ["--node-rank: 2 is not in 0..1"]


def test_architecture_without_a_plan_is_named():
    from tuneplex_automodel.distributed import Dist
    from tuneplex_automodel.parallelize import parallelize

    class GPT2LMHeadModel:  # only the class name matters before any sharding
        pass

    d = Dist(rank=0, world_size=2, local_rank=0, device=None, dims=dims(1, 2))
    with pytest.raises(UsageError) as exc:
        parallelize(GPT2LMHeadModel(), dist=d, lora=False)
    assert exc.value.lines() == [
        "model: GPT2LMHeadModel: no parallel plan for this architecture; supported: "
        "LlamaForCausalLM, MistralForCausalLM, MixtralForCausalLM, Qwen2ForCausalLM, "
        "Qwen3ForCausalLM, Qwen3MoeForCausalLM (or train it in one process)"
    ]


def test_tensor_parallel_must_divide_heads():
    from types import SimpleNamespace

    from tuneplex_automodel.parallelize import _check_divisible

    config = SimpleNamespace(num_attention_heads=4, num_key_value_heads=2, intermediate_size=128)
    with pytest.raises(UsageError) as exc:
        _check_divisible(config, 4)
    assert exc.value.lines() == [
        "parallelism.tensor_parallel_size: 4 does not divide the model's num_key_value_heads (2)"
    ]
