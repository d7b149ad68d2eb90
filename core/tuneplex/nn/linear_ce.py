"""The output head and the cross-entropy over the counted positions, fused: the head runs over
chunks of tokens, and each chunk's gradients (hidden states, head weight, bias) are made in the
forward pass while its logits are at hand, so full-vocabulary logits never exist and nothing is
computed twice. Backward only scales the stored gradients.

Float32 softmax and accumulation whatever the compute dtype; under bf16 autocast the head's
matmuls run in bf16, as the model's own forward does. Imports torch when called.
"""

from __future__ import annotations

import functools

from tuneplex.nn.logits import finish_logits, logit_rule

HEAD_CHUNK_ELEMENTS = 1 << 24
"""Logits per chunk (64 MiB in fp32): tokens per chunk = this / vocab."""


def linear_cross_entropy_sum(hidden, targets, *, head, config):
    """Float32 cross-entropy summed over the counted `targets` of `finish_logits(head(hidden))`.

    A plain `nn.Linear` head takes the fused path; any other head (a peft-wrapped one, a sharded
    weight) runs as a module over the same chunks, each chunk's logits made again in backward.
    """
    import torch

    states, wanted, _, size = _counted(hidden, targets, head=head)
    if type(head) is torch.nn.Linear and type(head.weight) is torch.nn.Parameter:
        dtype = torch.get_autocast_dtype(hidden.device.type)
        if not torch.is_autocast_enabled(hidden.device.type):
            dtype = head.weight.dtype
        scaling, cap = logit_rule(config)
        return _fused().apply(states, head.weight, head.bias, wanted, size, dtype, scaling, cap)
    return -_token_log_probs(states, wanted, head=head, config=config, size=size).sum()


def _counted(hidden, targets, *, head=None):
    """(hidden states of the counted positions, their targets, their flat positions, tokens per
    chunk of `head`'s vocabulary)."""
    from tuneplex.data.targets import IGNORE_INDEX

    flat = targets.reshape(-1)
    keep = (flat != IGNORE_INDEX).nonzero().squeeze(1)
    states = hidden.reshape(-1, hidden.shape[-1]).index_select(0, keep)
    size = max(1, HEAD_CHUNK_ELEMENTS // head.weight.shape[0])
    return states, flat.index_select(0, keep), keep, size


@functools.cache
def _fused():
    """The autograd Function, defined on first use (torch is imported only when called)."""
    import torch

    class FusedLinearCrossEntropy(torch.autograd.Function):
        @staticmethod
        def forward(ctx, states, weight, bias, wanted, size, dtype, scaling, cap):
            need_states, need_weight, need_bias = ctx.needs_input_grad[:3]
            need_any = need_states or need_weight or need_bias
            with torch.autocast(states.device.type, enabled=False):
                w = weight.to(dtype)
                b = bias.to(dtype) if bias is not None else None
                total = torch.zeros((), dtype=torch.float32, device=states.device)
                g_states = torch.zeros_like(states) if need_states else None
                g_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight else None
                g_bias = torch.zeros_like(bias, dtype=torch.float32) if need_bias else None
                for start in range(0, wanted.numel(), size):
                    part = slice(start, start + size)
                    h = states[part].to(dtype)
                    y = wanted[part].unsqueeze(1)
                    z = torch.nn.functional.linear(h, w, b).float()
                    if scaling is not None:
                        z = z / scaling
                    if cap is not None:
                        t = torch.tanh(z / cap)
                        z = t * cap
                    picked = z.gather(1, y)
                    lse, sums = _lse_(z)
                    total += (lse - picked).sum()
                    if not need_any:
                        continue
                    g = z.div_(sums)  # softmax, in place of the logits
                    g.scatter_add_(1, y, torch.full_like(y, -1, dtype=g.dtype))
                    if cap is not None:
                        g.mul_(1 - t * t)
                    if scaling is not None:
                        g.div_(scaling)
                    g = g.to(dtype)
                    if need_states:
                        g_states[part] = g @ w
                    if need_weight:
                        _add_outer_(g_weight, g, h)
                    if need_bias:
                        g_bias.add_(g.sum(0, dtype=torch.float32))
                    z = g = t = None  # this chunk's logits freed before the next chunk's are made
            ctx.save_for_backward(g_states, g_weight, g_bias)
            ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
            return total

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx, grad):
            # scaled in place: the stored gradients are this function's own, used once (no
            # second copy of a vocabulary-sized weight gradient)
            g_states, g_weight, g_bias = ctx.saved_tensors
            w_dtype, b_dtype = ctx.dtypes
            out_states = g_states.mul_(grad.to(g_states.dtype)) if g_states is not None else None
            out_weight = g_weight.mul_(grad).to(w_dtype) if g_weight is not None else None
            out_bias = g_bias.mul_(grad).to(b_dtype) if g_bias is not None else None
            return out_states, out_weight, out_bias, None, None, None, None, None

    return FusedLinearCrossEntropy


def row_log_probs(hidden, targets, *, head, config):
    """Float32 log-probability of the counted `targets` of each row, summed per row ([rows]),
    the head run over chunks of counted positions, each chunk's logits made again in backward
    (the gradient of each row's sum is scaled by that row's own upstream gradient, which the
    fused path cannot take)."""
    import torch

    states, wanted, keep, size = _counted(hidden, targets, head=head)
    logps = _token_log_probs(states, wanted, head=head, config=config, size=size)
    sums = torch.zeros(targets.shape[0], dtype=torch.float32, device=hidden.device)
    return sums.index_add(0, keep // targets.shape[-1], logps)


def token_log_probs(
    hidden, targets, *, head, config, temperature: float = 1.0, chunk: int | None = None
):
    """Float32 log-probability of each counted target, in the targets' shape ([rows, positions];
    0 where nothing counts): what a per-token policy-gradient loss takes, computed as
    `row_log_probs` is (no full-vocabulary logits; chunks made again in backward). The logits
    are divided by `temperature` (a sampler's distribution); `chunk`: positions per chunk of
    the head at most (and never more than 2^24 logits a chunk)."""
    import torch

    states, wanted, keep, size = _counted(hidden, targets, head=head)
    logps = _token_log_probs(
        states,
        wanted,
        head=head,
        config=config,
        size=min(chunk, size) if chunk else size,
        temperature=temperature,
    )
    flat = torch.zeros(targets.numel(), dtype=torch.float32, device=hidden.device)
    return flat.index_add(0, keep, logps).reshape(targets.shape)


def _token_log_probs(states, wanted, *, head, config, size: int, temperature: float = 1.0):
    """Float32 log-probability of each wanted token. A plain `nn.Linear` head takes the fused
    path (`_fused_log_probs`); any other head (a peft-wrapped one, a sharded weight) is called
    as a module over chunks, each chunk checkpointed (its logits made again in backward)."""
    import torch
    import torch.utils.checkpoint

    if type(head) is torch.nn.Linear and type(head.weight) is torch.nn.Parameter:
        dtype = torch.get_autocast_dtype(states.device.type)
        if not torch.is_autocast_enabled(states.device.type):
            dtype = head.weight.dtype
        scaling, cap = logit_rule(config)
        rule = (size, dtype, scaling, cap, temperature)
        return _fused_log_probs().apply(states, head.weight, head.bias, wanted, rule)

    parts = [
        torch.utils.checkpoint.checkpoint(
            _chunk_log_probs,
            head,
            states[start : start + size],
            wanted[start : start + size],
            config,
            temperature,
            use_reentrant=False,
        )
        for start in range(0, wanted.numel(), size)
    ]
    if not parts:  # no counted token: zeros that keep every parameter in the graph
        return 0.0 * head(states[:0]).float().sum() + 0.0 * states.sum() + states.new_zeros(0)
    return torch.cat(parts)


def _chunk_log_probs(head, states, wanted, config, temperature: float = 1.0):
    logits = finish_logits(config, head(states).float())
    if temperature != 1.0:
        logits = logits / temperature
    return logits.gather(1, wanted.unsqueeze(1)).squeeze(1) - logits.logsumexp(-1)


def _lse_(z):
    """(log-sum-exp over the last dimension of `z`, sum of exp(z - max)), leaving exp(z - max)
    in `z`: torch.logsumexp would make a temporary of z's size (a second chunk of logits at
    the head's peak)."""
    import torch

    top = z.amax(dim=-1, keepdim=True)
    top = top.masked_fill(~torch.isfinite(top), 0.0)
    sums = z.sub_(top).exp_().sum(dim=-1, keepdim=True)
    return top + sums.log(), sums


WEIGHT_GRAD_SLICE_ELEMENTS = 1 << 22
"""Elements of the head's weight gradient made per matmul when the compute dtype is not the
accumulator's (16 MiB in fp32)."""


def _add_outer_(acc, g, h):
    """`acc += g.t() @ h` ([vocab, hidden]) without a vocabulary-sized temporary: in the
    accumulator's dtype by addmm_ in place; else (bf16 products, a float32 sum) over slices of
    the vocabulary, so neither the bf16 product nor its float32 cast for the add is whole."""
    if acc.dtype == g.dtype:
        acc.addmm_(g.t(), h)
        return
    rows = max(1, WEIGHT_GRAD_SLICE_ELEMENTS // acc.shape[1])
    for start in range(0, acc.shape[0], rows):
        acc[start : start + rows].add_(g[:, start : start + rows].t() @ h)


def _chunk_logits(h, w, b, scaling, cap, temperature):
    """One chunk's float32 logits as the family finishes them, divided by `temperature`; and the
    soft cap's tanh (None without a cap), which the gradient needs."""
    import torch

    z = torch.nn.functional.linear(h, w, b).float()
    if scaling is not None:
        z = z / scaling
    t = None
    if cap is not None:
        t = torch.tanh(z / cap)
        z = t * cap
    if temperature != 1.0:
        z = z / temperature
    return z, t


def _logit_grad_(p, y, rows, t, scaling, cap, temperature):
    """In place of `p` (a chunk's softmax): the gradient of sum(rows * log p[y]) with respect to
    the head's raw output, through temperature, soft cap and scaling."""
    p.mul_(rows.neg().unsqueeze(1))
    p.scatter_add_(1, y, rows.unsqueeze(1))
    if temperature != 1.0:
        p.div_(temperature)
    if cap is not None:
        p.mul_(1 - t * t)
    if scaling is not None:
        p.div_(scaling)
    return p


@functools.cache
def _fused_log_probs():
    """The autograd Function of `_token_log_probs`' fused path, defined on first use.

    Forward: each chunk's logits, log-softmax at the wanted ids, float32. With only the hidden
    states needing a gradient (a frozen head: LoRA) the gradient of each token's log-probability
    with respect to its hidden state is made in forward while the chunk's logits are at hand
    ([tokens, hidden], small beside the logits) and backward only scales it by each token's
    upstream gradient: no logits made again. With the head's weight or bias trained, backward
    makes each chunk's logits again and turns them into the gradient in place (one logits-sized
    buffer per chunk, no autograd graph of the softmax).
    """
    import torch

    class FusedTokenLogProbs(torch.autograd.Function):
        @staticmethod
        def forward(ctx, states, weight, bias, wanted, rule):
            size, dtype, scaling, cap, temperature = rule
            need_states, need_weight, need_bias = ctx.needs_input_grad[:3]
            recompute = need_weight or need_bias
            out = torch.empty(wanted.numel(), dtype=torch.float32, device=states.device)
            lse_all = torch.empty_like(out) if recompute else None
            g_states = torch.empty_like(states) if need_states and not recompute else None
            with torch.autocast(states.device.type, enabled=False):
                w = weight.to(dtype)
                b = bias.to(dtype) if bias is not None else None
                for start in range(0, wanted.numel(), size):
                    part = slice(start, start + size)
                    y = wanted[part].unsqueeze(1)
                    z, t = _chunk_logits(states[part].to(dtype), w, b, scaling, cap, temperature)
                    picked = z.gather(1, y)
                    lse, sums = _lse_(z)
                    out[part] = (picked - lse).squeeze(1)
                    if lse_all is not None:
                        lse_all[part] = lse.squeeze(1)
                    if g_states is not None:
                        ones = torch.ones(y.shape[0], dtype=z.dtype, device=z.device)
                        g = _logit_grad_(z.div_(sums), y, ones, t, scaling, cap, temperature)
                        g_states[part] = (g.to(dtype) @ w).to(states.dtype)
            ctx.rule = rule
            if recompute:
                ctx.save_for_backward(states, weight, bias, wanted, lse_all)
            else:
                ctx.save_for_backward(g_states)
            ctx.recompute = recompute
            return out

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx, grad):
            if not ctx.recompute:
                (g_states,) = ctx.saved_tensors
                if g_states is None:
                    return None, None, None, None, None
                return g_states.mul_(grad.unsqueeze(1).to(g_states.dtype)), None, None, None, None
            states, weight, bias, wanted, lse_all = ctx.saved_tensors
            size, dtype, scaling, cap, temperature = ctx.rule
            need_states, need_weight, need_bias = ctx.needs_input_grad[:3]
            g_states = torch.empty_like(states) if need_states else None
            g_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight else None
            g_bias = torch.zeros_like(bias, dtype=torch.float32) if need_bias else None
            with torch.autocast(states.device.type, enabled=False):
                w = weight.to(dtype)
                b = bias.to(dtype) if bias is not None else None
                for start in range(0, wanted.numel(), size):
                    part = slice(start, start + size)
                    h = states[part].to(dtype)
                    y = wanted[part].unsqueeze(1)
                    z, t = _chunk_logits(h, w, b, scaling, cap, temperature)
                    p = z.sub_(lse_all[part].unsqueeze(1)).exp_()
                    g = _logit_grad_(p, y, grad[part].float(), t, scaling, cap, temperature)
                    g = g.to(dtype)
                    if g_states is not None:
                        g_states[part] = (g @ w).to(states.dtype)
                    if g_weight is not None:
                        _add_outer_(g_weight, g, h)
                    if g_bias is not None:
                        g_bias.add_(g.sum(0, dtype=torch.float32))
            out_weight = g_weight.to(weight.dtype) if g_weight is not None else None
            out_bias = g_bias.to(bias.dtype) if g_bias is not None else None
            return g_states, out_weight, out_bias, None, None

    return FusedTokenLogProbs
