"""Expert parallelism for Hugging Face mixture-of-experts models (Qwen3-MoE, Mixtral, ...).

Each rank of the expert-parallel mesh keeps E/ep of the experts of every MoE layer and reads
its own batch, like a data-parallel rank. In each layer a rank sends every (token, expert)
assignment to the rank that holds the expert (an all-to-all), runs its local experts on what
it receives, and sends the results back (the reverse all-to-all); the routing weights are
applied where the token lives, so the router trains as in one process.

The experts found here are transformers 5's fused modules: 3-D `gate_up_proj` (E, 2I, H) and
`down_proj` (E, H, I) parameters with a gated activation. Their parameters become Shard(0)
DTensors under their own names, so state-dict keys do not change and the distributed
checkpoint API gathers and scatters the full (E, ...) tensors. Imports torch when called.
"""

from __future__ import annotations

import contextlib
import functools
from typing import TYPE_CHECKING, Any

from tuneplex.errors import Problem, UsageError
from tuneplex.nn.models import unwrap_peft

if TYPE_CHECKING:
    import torch
    from torch import nn
    from torch.distributed.device_mesh import DeviceMesh

EP_KEY = "parallelism.expert_parallel_size"
_PARAMS = ("gate_up_proj", "down_proj")
_EP_CLASSES: dict[tuple[type, type], type] = {}


def moe_experts(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The fused experts modules of `model` (a transformers model or a peft wrapper of one).

    Found by shape, not class name, so any model family built on the fused layout qualifies.
    """
    found = []
    for name, mod in model.named_modules():
        params = [mod._parameters.get(p) for p in _PARAMS]
        if hasattr(mod, "num_experts") and all(p is not None and p.dim() == 3 for p in params):
            found.append((name, mod))
    return found


def check_divides(model: nn.Module, *, ep: int) -> None:
    """Refuse, in one line the user can act on, an expert-parallel size the model cannot take."""
    if ep <= 1:
        return
    counts = sorted({int(mod.num_experts) for _, mod in moe_experts(model)})
    cls = type(unwrap_peft(model)).__name__
    if not counts:
        raise UsageError(
            Problem(
                EP_KEY,
                f"{cls} is not a mixture-of-experts model (no fused experts "
                f"layers); set expert_parallel_size to 1 (got {ep})",
            )
        )
    for experts in counts:
        if experts % ep == 0:
            continue
        valid = [d for d in range(1, experts + 1) if experts % d == 0]
        raise UsageError(
            Problem(
                EP_KEY,
                f"{ep} does not divide the {experts} experts of {cls}; valid "
                f"sizes: {', '.join(map(str, valid))}",
            )
        )
    for name, mod in moe_experts(model):
        unsupported = [
            what
            for what, bad in (
                ("bias", getattr(mod, "has_bias", False) or hasattr(mod, "gate_up_proj_bias")),
                ("no gate", not getattr(mod, "has_gate", True)),
                ("transposed weights", getattr(mod, "is_transposed", False)),
                ("interleaved gate/up", not getattr(mod, "is_concatenated", True)),
                ("post-expert norm", getattr(mod, "has_post_expert_norm", False)),
            )
            if bad
        ]
        if unsupported:
            raise UsageError(
                Problem(
                    EP_KEY,
                    f"{name} ({type(mod).__name__}) has {', '.join(unsupported)}; expert "
                    "parallelism supports fused [gate; up] experts without bias only",
                )
            )


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The expert weights, for the caller to keep out of FSDP: each EP rank owns its shard, and
    its gradient already sums every EP rank's tokens, so it needs no reduction over the EP mesh
    (only over replicas of the shard, if any)."""
    return [getattr(mod, p) for _, mod in moe_experts(model) for p in _PARAMS]


def reduce_expert_grads(params: list[nn.Parameter], *, dist) -> None:
    """Expert gradients as FSDP would leave them: summed over the replicas of each expert
    shard (data-parallel ranks outside the expert group), divided by the data-parallel width
    (every rank's loss is scaled by it for FSDP's average)."""
    import torch.distributed as tdist

    edp = dist.dp_size // dist.dims.ep
    for p in params:
        if p.grad is None:
            continue
        g = p.grad.to_local()
        if edp > 1:
            tdist.all_reduce(g, group=dist.group("edp"))
        g.div_(dist.dp_size)


def expert_parallel(model: nn.Module, *, mesh: DeviceMesh) -> None:
    """Shard every experts module over the 1-D `mesh` and route tokens with all-to-all.

    Every rank must have loaded the same full model; afterwards each keeps only its slice of
    the experts (the rest is freed), and its forward serves all ranks' tokens for those experts.
    Apply LoRA before, not after: peft's adapters on the fused experts (which its "all-linear"
    adds for MoE models) stay whole on every rank, and each rank adds only its own experts'
    share of them, so their gradients are zero outside that share and sum over the ranks like
    any other replicated parameter's.
    """
    from torch import nn
    from torch.distributed.tensor import DTensor, Shard

    if mesh.ndim != 1:
        raise ValueError(f"expert_parallel needs a 1-D device mesh, got {mesh.ndim}-D")
    ep, rank = mesh.size(), mesh.get_local_rank()
    check_divides(model, ep=ep)
    wrappers = _lora_wrappers(model)
    for _, mod in moe_experts(model):
        if isinstance(mod, _EPExpertsMixin):
            raise ValueError(f"{type(mod).__name__} is already expert-parallel")
        n = mod.num_experts // ep
        for pname in _PARAMS:
            full = getattr(mod, pname)
            local = full.detach()[rank * n : (rank + 1) * n].clone()
            dt = DTensor.from_local(
                local, mesh, [Shard(0)], run_check=False, shape=full.shape, stride=full.stride()
            )
            setattr(mod, pname, nn.Parameter(dt, requires_grad=full.requires_grad))
        lora = wrappers.get(id(mod), {})
        for wrapper in lora.values():
            wrapper.__class__ = _subclass(type(wrapper), _LoraLeftToExperts)
        mod.__class__ = _subclass(type(mod), _EPExpertsMixin)
        mod._ep_group, mod._ep_size, mod._ep_first = mesh.get_group(), ep, rank * n
        mod._ep_lora = lora  # a plain dict: the wrappers are not made children of `mod`


def _lora_wrappers(model: nn.Module) -> dict[int, dict[str, nn.Module]]:
    """peft's ParamWrappers around each experts module: {id(experts): {param name: wrapper}}."""
    found: dict[int, dict[str, nn.Module]] = {}
    for mod in model.modules():
        pname = getattr(mod, "parameter_name", None)
        if pname in _PARAMS and hasattr(mod, "get_base_layer") and hasattr(mod, "lora_A"):
            found.setdefault(id(mod.get_base_layer()), {})[pname] = mod
    return found


def _subclass(cls: type, mixin: type) -> type:
    """`cls` with `mixin`'s methods first. Swapping a module's class (rather than wrapping the
    module) keeps parameter names, and the class name still tells the model family."""
    key = (cls, mixin)
    if key not in _EP_CLASSES:
        _EP_CLASSES[key] = type(f"ExpertParallel{cls.__name__}", (mixin, cls), {})
    return _EP_CLASSES[key]


class _LoraLeftToExperts:
    """A peft ParamWrapper whose delta the expert-parallel forward adds, per local expert:
    peft's own would add the delta of all E experts to the E/ep local ones."""

    @contextlib.contextmanager
    def _activate_lora(self, active_adapters):
        yield


class _EPExpertsMixin:
    """forward(hidden_states (T, H), top_k_index (T, k), top_k_weights (T, k)) -> (T, H)."""

    _ep_group: Any
    _ep_size: int
    _ep_first: int
    _ep_lora: dict[str, Any]

    def forward(self, hidden_states, top_k_index, top_k_weights):
        import torch
        import torch.distributed as dist

        ep, group = self._ep_size, self._ep_group
        n_local = self.num_experts // ep
        k = top_k_index.shape[-1]
        # Group the (token, k) assignments by expert, hence by destination rank.
        flat = top_k_index.reshape(-1)
        order = torch.argsort(flat, stable=True)
        token = order // k
        per_expert = torch.bincount(flat, minlength=self.num_experts)
        # Each rank learns how many rows it gets from every rank for each of its experts.
        got = torch.empty_like(per_expert)
        dist.all_to_all_single(got, per_expert, group=group)
        send_splits = per_expert.view(ep, n_local).sum(1).tolist()
        recv_splits = got.view(ep, n_local).sum(1).tolist()
        received = _all_to_all().apply(hidden_states[token], recv_splits, send_splits, group)
        # Rows arrive per source rank, each block sorted by expert: regroup them by expert.
        local_expert = torch.repeat_interleave(
            torch.arange(n_local, device=got.device).repeat(ep), got
        )
        by_expert = torch.argsort(local_expert, stable=True)
        rows = received[by_expert]
        counts = got.view(ep, n_local).sum(0).tolist()
        gate_up, down = self._local_weight("gate_up_proj"), self._local_weight("down_proj")
        outs = []
        for e, chunk in enumerate(rows.split(counts)):
            # Empty chunks too, so every local expert gets a (zero) gradient on every rank.
            h = torch.nn.functional.linear(chunk, gate_up[e])
            h = self._apply_gate(h) if hasattr(self, "_apply_gate") else _gate(self, h)
            outs.append(torch.nn.functional.linear(h, down[e]))
        computed = torch.cat(outs)
        computed = computed.new_empty(computed.shape).index_copy(0, by_expert, computed)
        returned = _all_to_all().apply(computed, send_splits, recv_splits, group)
        weighted = returned * top_k_weights.reshape(-1)[order, None]
        out = torch.zeros_like(hidden_states)
        return out.index_add(0, token, weighted.to(out.dtype))

    def _local_weight(self, pname: str):
        """This rank's experts of `pname`, plus their share of any active LoRA adapters."""
        import torch

        weight = getattr(self, pname).to_local()
        wrapper = self._ep_lora.get(pname)
        if wrapper is None or wrapper.disable_adapters or wrapper.merged:
            return weight
        lo, hi = self._ep_first, self._ep_first + weight.shape[0]
        for adapter in wrapper.active_adapters:
            if adapter not in wrapper.lora_A:
                continue
            if hasattr(wrapper, "get_delta_factors"):  # (E, out, r), (E, r, in), scale
                lhs, rhs, scaling = wrapper.get_delta_factors(adapter)
                weight = torch.baddbmm(weight, lhs[lo:hi], rhs[lo:hi], alpha=scaling)
            else:
                weight = weight + wrapper.get_delta_weight(adapter)[lo:hi]
        return weight


def _gate(module: Any, gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return module.act_fn(gate) * up


@functools.cache
def _all_to_all():
    import torch
    import torch.distributed as dist

    class AllToAll(torch.autograd.Function):
        """all_to_all_single whose backward is the reverse exchange (works on gloo and NCCL;
        torch.distributed.nn.functional's version is deprecated)."""

        @staticmethod
        def forward(ctx, x, out_splits, in_splits, group):
            ctx.splits, ctx.group = (out_splits, in_splits), group
            out = x.new_empty((sum(out_splits), *x.shape[1:]))
            dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
            return out

        @staticmethod
        def backward(ctx, grad):
            out_splits, in_splits = ctx.splits
            back = grad.new_empty((sum(in_splits), *grad.shape[1:]))
            dist.all_to_all_single(back, grad.contiguous(), in_splits, out_splits, group=ctx.group)
            return back, None, None, None

    return AllToAll
