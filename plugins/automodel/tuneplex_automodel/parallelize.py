"""Context, expert and tensor parallelism, then FSDP2, applied by one function per model family.

Tensor parallel (DTensor): the attention and MLP projections are split column-wise (q, k, v,
gate, up) and row-wise (o, down), so each decoder layer needs one all-reduce forward and one
backward per block. LoRA adapters follow their base layer: for a column-wise base, A stays whole
and B is split by columns; for a row-wise base, A is split by rows and B stays whole. Embeddings,
norms and the output head are replicated. FSDP2 (`fully_shard`) then shards every decoder layer
and the root over the data × context-parallel ranks; on CUDA parameters are gathered in bf16 and
gradients reduced in fp32. Expert weights (expert parallelism) are sharded over the expert
ranks instead and left out of FSDP; `reduce_expert_grads` completes their gradients.
"""

from __future__ import annotations

from tuneplex.errors import Problem, UsageError
from tuneplex.models import adapter_names, unwrap_peft

from tuneplex_automodel.distributed import Dist

COLWISE = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
)
ROWWISE = ("self_attn.o_proj", "mlp.down_proj")


def llama_style(model, *, dist: Dist, separate_head: bool = False, root=None) -> None:
    """Llama, Mistral, Qwen2, Qwen3 (and their MoE kin) share module names and shapes.

    `separate_head`: the decoder and the output head become FSDP units of their own, so they
    can be called one after the other (distillation projects hidden states through the head in
    chunks) instead of only through the model's forward. `root`: the module whose forward
    runs (a pipeline stage), sharded last instead of the model.
    """
    import torch.nn as nn

    base = unwrap_peft(model)
    layers = base.model.layers
    layers = list(layers.values()) if isinstance(layers, nn.ModuleDict) else list(layers)
    if dist.dims.cp > 1:
        from tuneplex_automodel.context_parallel import enable

        enable(model, group=dist.group("cp"))
    ignored: set = set()
    if dist.dims.ep > 1:
        from tuneplex_automodel.moe import expert_parallel, expert_parameters

        expert_parallel(model, mesh=dist.mesh("ep"))
        ignored = set(expert_parameters(model))
    if dist.tp_size > 1:
        _check_divisible(base.config, dist.tp_size)
        from torch.distributed.tensor.parallel import (
            ColwiseParallel,
            RowwiseParallel,
            parallelize_module,
        )

        plan = {}
        adapters = adapter_names(model)
        for name in COLWISE:
            if adapters:
                plan[f"{name}.base_layer"] = ColwiseParallel()
                plan.update({f"{name}.lora_B.{a}": ColwiseParallel() for a in adapters})
            else:
                plan[name] = ColwiseParallel()
        for name in ROWWISE:
            if adapters:
                plan[f"{name}.base_layer"] = RowwiseParallel()
                plan.update({f"{name}.lora_A.{a}": RowwiseParallel() for a in adapters})
            else:
                plan[name] = RowwiseParallel()
        for layer in layers:
            parallelize_module(layer, dist.mesh("tp"), _present(layer, plan))
    if dist.data_size > 1:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = None
        if dist.device.type == "cuda":
            import torch

            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        kw = {"mesh": dist.mesh("dp_cp"), **({"mp_policy": mp} if mp else {})}
        if ignored:
            kw["ignored_params"] = ignored
        for i, layer in enumerate(layers):
            # the last layer's parameters are needed again at once by the root: keep them
            fully_shard(layer, reshard_after_forward=i < len(layers) - 1, **kw)
        if separate_head:
            if base.get_output_embeddings().weight is base.get_input_embeddings().weight:
                raise UsageError(
                    Problem(
                        "training.training_type",
                        f"distillation across {dist.dp_size} data-parallel ranks needs an "
                        "output head not tied to the input embeddings (this model ties them); "
                        "train it in one process",
                    )
                )
            fully_shard(base.get_decoder(), **kw)
            fully_shard(base.get_output_embeddings(), **kw)
        fully_shard(root if root is not None else model, **kw)


def reduce_expert_grads(model, *, dist: Dist) -> None:
    """Expert gradients as FSDP would leave them: summed over the replicas of each expert
    shard (data-parallel ranks outside the expert group), divided by the data-parallel width
    (every rank's loss is scaled by it for FSDP's average)."""
    if dist.dims.ep == 1:
        return
    import torch.distributed as tdist

    from tuneplex_automodel.moe import expert_parameters

    edp = dist.dp_size // dist.dims.ep
    for p in expert_parameters(model):
        if p.grad is None:
            continue
        g = p.grad.to_local()
        if edp > 1:
            tdist.all_reduce(g, group=dist.group("edp"))
        g.div_(dist.dp_size)


def _present(layer, plan: dict) -> dict:
    """The plan entries whose module exists (LoRA may target only some projections)."""
    names = {n for n, _ in layer.named_modules()}
    return {k: v for k, v in plan.items() if k in names}


def _check_divisible(config, tp: int) -> None:
    problems = []
    for attr in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        value = getattr(config, attr, None)
        if value is not None and value % tp:
            problems.append(
                Problem(
                    "parallelism.tensor_parallel_size",
                    f"{tp} does not divide the model's {attr} ({value})",
                )
            )
    if problems:
        raise UsageError(problems)


PARALLELIZE = {
    "LlamaForCausalLM": llama_style,
    "MistralForCausalLM": llama_style,
    "Qwen2ForCausalLM": llama_style,
    "Qwen3ForCausalLM": llama_style,
    "Qwen3MoeForCausalLM": llama_style,
    "MixtralForCausalLM": llama_style,
}


def parallelize(model, *, dist: Dist, separate_head: bool = False, root=None) -> None:
    """Apply the job's parallelism in place (nothing on one process)."""
    if dist.world_size == 1:
        return
    cls = type(unwrap_peft(model)).__name__
    fn = PARALLELIZE.get(cls)
    if fn is None:
        raise UsageError(
            Problem(
                "model",
                f"{cls}: no parallel plan for this architecture; supported: "
                f"{', '.join(sorted(PARALLELIZE))} (or train it in one process)",
            )
        )
    fn(model, dist=dist, separate_head=separate_head, root=root)
