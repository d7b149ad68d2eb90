"""Rendezvous settings for multi-node launches (no processes started)."""

import pytest
from tuneplex.backend import NO_LAUNCH_OPTIONS, LaunchOptions
from tuneplex.errors import UsageError
from tuneplex_automodel.launch import expand_nodelist, rendezvous
from tuneplex_automodel.parallel.dims import ParallelDims


def dims(nodes=2, gpus=8, *, tp=1, pp=1):
    return ParallelDims(
        nodes, gpus, tp, pp, 1, 1, global_batch_size=16 * nodes * gpus, micro_batch_size=1
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
    options = LaunchOptions(node_rank=1, master_addr="10.0.0.1", master_port=1234)
    assert rendezvous(dims(), options=options, env={}) == {
        "backend": "static",
        "endpoint": "10.0.0.1:1234",
        "node_rank": 1,
    }


def test_slurm_variables():
    env = {"SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "gpu[3-4]"}
    assert rendezvous(dims(), options=NO_LAUNCH_OPTIONS, env=env) == {
        "backend": "static",
        "endpoint": "gpu3:29500",
        "node_rank": 0,
    }


def test_flags_win_over_slurm_variables():
    env = {"SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "gpu[3-4]"}
    options = LaunchOptions(node_rank=1, master_addr="head", master_port=4321)
    assert rendezvous(dims(), options=options, env=env) == {
        "backend": "static",
        "endpoint": "head:4321",
        "node_rank": 1,
    }
    node_only = rendezvous(dims(), options=LaunchOptions(node_rank=1), env=env)
    assert node_only == {"backend": "static", "endpoint": "gpu3:29500", "node_rank": 1}


def test_c10d_endpoint_wins():
    options = LaunchOptions(rdzv_endpoint="head:29400", node_rank=3)
    assert rendezvous(dims(4), options=options, env={"SLURM_NODEID": "1"}) == {
        "backend": "c10d",
        "endpoint": "head:29400",
        "node_rank": None,
    }


def test_our_old_environment_variables_are_not_read():
    env = {"TUNEPLEX_NODE_RANK": "1", "TUNEPLEX_MASTER_ADDR": "h", "TUNEPLEX_RDZV_ENDPOINT": "x:1"}
    with pytest.raises(UsageError) as exc:
        rendezvous(dims(), options=NO_LAUNCH_OPTIONS, env=env)
    assert exc.value.lines()[0].startswith(
        "parallelism.num_nodes: 2 nodes need --node-rank and --master-addr on every node"
    )


def test_single_node_needs_nothing():
    r = rendezvous(dims(1, 2), options=NO_LAUNCH_OPTIONS, env={})
    assert (
        r["backend"] == "static" and r["endpoint"].startswith("127.0.0.1:") and r["node_rank"] == 0
    )


def test_node_rank_out_of_range():
    options = LaunchOptions(node_rank=2, master_addr="h")
    with pytest.raises(UsageError) as exc:
        rendezvous(dims(), options=options, env={})
    assert exc.value.lines() == ["--node-rank: 2 is not in 0..1"]


def test_backend_hands_the_options_to_the_launcher(monkeypatch, tmp_path):
    """AutomodelBackend.train -> trainer.train -> launch(...): the options arrive as a value."""
    import tuneplex_automodel.trainer as trainer
    from tuneplex.plugins import registry

    seen = {}
    monkeypatch.setattr(trainer, "check_model_ref", lambda *a, **k: None)
    monkeypatch.setattr(trainer, "launch", lambda *a, **k: seen.update(args=a, kwargs=k))
    backend = registry().get("automodel").backend
    job = backend.job_schema.model_validate(
        {
            "model": "org/base",
            "dataset": {"training": "train.jsonl"},
            "batch": {"global_batch_size": 4, "micro_batch_size": 1},
            "parallelism": {"num_nodes": 2, "num_gpus_per_node": 2},
        }
    )
    options = LaunchOptions(node_rank=1, master_addr="head", master_port=29501)
    backend.train(job, tmp_path, resume=True, launch=options)
    assert seen["kwargs"] == {"resume": True, "options": options}
    assert seen["args"][0] == job.parallel_dims() and seen["args"][2] == tmp_path


@pytest.mark.parametrize(
    ("cls", "sizes", "line"),
    [
        (
            "GPT2LMHeadModel",
            {"tp": 2},
            "parallelism.tensor_parallel_size: 2: GPT2LMHeadModel has no tensor-parallel plan; "
            "supported: Gemma2ForCausalLM, Gemma3ForCausalLM, GraniteForCausalLM, "
            "LlamaForCausalLM, MistralForCausalLM, MixtralForCausalLM, Phi3ForCausalLM, "
            "Qwen2ForCausalLM, Qwen3ForCausalLM, Qwen3MoeForCausalLM (data, context and expert "
            "parallelism need none)",
        ),
        (
            "Gemma2ForCausalLM",
            {"pp": 2},
            "parallelism.pipeline_parallel_size: 2: Gemma2ForCausalLM has no pipeline "
            "description; supported: GraniteForCausalLM, LlamaForCausalLM, MistralForCausalLM, "
            "MixtralForCausalLM, Phi3ForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, "
            "Qwen3MoeForCausalLM",
        ),
    ],
)
def test_architecture_without_a_plan_is_named(cls, sizes, line):
    """Data parallelism needs no plan; tensor and pipeline parallelism name what has one."""
    from tuneplex_automodel.parallel.parallelize import check_plan

    assert check_plan("GPT2LMHeadModel", dist_dims=dims(1, 2)) is None
    with pytest.raises(UsageError) as exc:
        check_plan(cls, dist_dims=dims(1, 2, **sizes))
    assert exc.value.lines() == [line]


def test_tensor_parallel_must_divide_heads():
    from types import SimpleNamespace

    from tuneplex_automodel.parallel.plans import FAMILIES
    from tuneplex_automodel.parallel.tp import check_divisible

    config = SimpleNamespace(num_attention_heads=4, num_key_value_heads=2, intermediate_size=128)
    with pytest.raises(UsageError) as exc:
        check_divisible(config, 4, sizes=FAMILIES["LlamaForCausalLM"].divides)
    assert exc.value.lines() == [
        "parallelism.tensor_parallel_size: 4 does not divide the model's num_key_value_heads (2)"
    ]


def test_readme_family_table_is_generated_from_the_plans():
    import re
    from pathlib import Path

    from tuneplex_automodel.parallel.plans import table_markdown

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    found = re.search(r"<!-- families:begin[^\n]*-->\n(.*?)<!-- families:end -->", readme, re.S)
    assert found and found[1] == table_markdown(), "regenerate: bash scripts/gen-docs.sh"


def test_lora_plan_follows_the_base_layer():
    from tuneplex_automodel.parallel.plans import FUSED, LLAMA, lora_plan

    assert lora_plan(LLAMA, []) == dict(LLAMA)
    got = lora_plan(FUSED, ["default"])
    assert got == {
        "self_attn.qkv_proj.base_layer": "colwise_gather",
        "self_attn.qkv_proj.lora_B.default": "colwise_gather",
        "self_attn.o_proj.base_layer": "rowwise_split",
        "self_attn.o_proj.lora_A.default": "rowwise_split",
        "mlp.gate_up_proj.base_layer": "colwise_gather",
        "mlp.gate_up_proj.lora_B.default": "colwise_gather",
        "mlp.down_proj.base_layer": "rowwise_split",
        "mlp.down_proj.lora_A.default": "rowwise_split",
    }
