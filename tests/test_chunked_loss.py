"""The chunked loss (`evaluation.chunked_loss_sum`: the output head over chunks of the counted
tokens, no full-vocabulary logits) equals the model's own forward and cross-entropy: the same
summed loss and the same gradient of every trained parameter, in fp32, within 1e-6 relative."""

from __future__ import annotations

import warnings

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from helpers import build_family, packed_and_padded_batch  # noqa: E402
from tuneplex.data.collate import collate  # noqa: E402
from tuneplex.data.targets import IGNORE_INDEX as X  # noqa: E402
from tuneplex.nn import evaluation, linear_ce  # noqa: E402


@pytest.mark.parametrize("ft", ["all_weights", "lora"])
@pytest.mark.parametrize(
    "cls", ["LlamaForCausalLM", "GraniteForCausalLM", "Gemma2ForCausalLM", "Qwen3ForCausalLM"]
)
def test_chunked_loss_and_gradients_equal_the_full_logits(cls, ft, tokenizers, monkeypatch):
    from tuneplex_automodel.model import apply_lora

    tok = tokenizers["chatml"][1]
    changes = {"final_logit_softcapping": 2.0} if cls.startswith("Gemma") else {}
    model = build_family(cls, tok, **changes).train()
    if ft == "lora":
        model = apply_lora(model, rank=4, alpha=8, target_modules=None)
        for name, p in model.named_parameters():  # B starts at 0: give A and B gradients both
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02)
    batch = packed_and_padded_batch(len(tok))
    counted = int((batch["targets"] != X).sum())
    vocab = model.get_output_embeddings().weight.shape[0]
    monkeypatch.setattr(linear_ce, "HEAD_CHUNK_ELEMENTS", vocab * 3)  # 3 tokens a chunk
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def grads(loss_fn):
        model.zero_grad(set_to_none=True)
        loss = loss_fn(model, batch)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in trained if p.grad is not None}

    want, want_grads = grads(evaluation.loss_sum)
    got, got_grads = grads(evaluation.chunked_loss_sum)
    assert counted > 3  # several chunks
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    assert got_grads.keys() == want_grads.keys() and len(got_grads) == len(trained)
    for name, g in want_grads.items():
        scale = g.abs().max().item()
        assert scale > 0, name
        assert (got_grads[name] - g).abs().max().item() <= 1e-6 * scale + 1e-12, name


@pytest.mark.parametrize("rule", [{}, {"logits_scaling": 4.0}, {"final_logit_softcapping": 1.5}])
def test_fused_head_with_bias_equals_linear_then_cross_entropy(rule, monkeypatch):
    """The fused function alone: loss and the gradients of the hidden states, the weight and the
    bias equal `F.linear` + the family's logit rule + cross-entropy, over several chunks."""
    from types import SimpleNamespace

    from tuneplex.nn.logits import finish_logits

    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=True)
    hidden = torch.randn(2, 9, 16, generator=g, requires_grad=True)
    targets = torch.randint(0, 50, (2, 9), generator=g)
    targets[0, :3] = X
    config = SimpleNamespace(**rule)
    monkeypatch.setattr(linear_ce, "HEAD_CHUNK_ELEMENTS", 50 * 4)

    def run(fn):
        for t in (hidden, head.weight, head.bias):
            t.grad = None
        loss = fn()
        loss.backward()
        return [loss.detach(), hidden.grad, head.weight.grad, head.bias.grad]

    def plain():
        logits = finish_logits(config, head(hidden).float()).reshape(-1, 50)
        return torch.nn.functional.cross_entropy(
            logits, targets.reshape(-1), ignore_index=X, reduction="sum"
        )

    want = run(plain)
    got = run(lambda: linear_ce.linear_cross_entropy_sum(hidden, targets, head=head, config=config))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_under_bf16_autocast_the_fused_loss_matches_the_models_own(tokenizers):
    """bf16 autocast: the head's matmuls in bf16, softmax and sums in fp32, as the model's own
    forward + cross-entropy; equal within bf16 rounding."""
    tok = tokenizers["chatml"][1]
    model = build_family("LlamaForCausalLM", tok).train()
    batch = packed_and_padded_batch(len(tok))
    results = []
    for fn in (evaluation.loss_sum, evaluation.chunked_loss_sum):
        model.zero_grad(set_to_none=True)
        loss = fn(model, batch, autocast=torch.bfloat16)
        loss.backward()
        results.append((loss.detach(), model.lm_head.weight.grad.clone()))
    (want, want_w), (got, got_w) = results
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=2e-3, atol=0)
    assert (got_w - want_w).norm() <= 2e-2 * want_w.norm()


def test_a_lora_wrapped_head_takes_the_recomputing_path(tokenizers, monkeypatch):
    """A head that is not a plain Linear (LoRA on `lm_head`) goes through the chunks as a
    module; its LoRA weights get the same gradients as with the full logits."""
    from tuneplex_automodel.model import apply_lora

    tok = tokenizers["chatml"][1]
    model = build_family("LlamaForCausalLM", tok)
    model = apply_lora(model, rank=4, alpha=8, target_modules=["q_proj", "lm_head"]).train()
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    assert type(model.get_output_embeddings()) is not torch.nn.Linear
    monkeypatch.setattr(linear_ce, "HEAD_CHUNK_ELEMENTS", len(tok) * 3)
    batch = packed_and_padded_batch(len(tok))
    results = []
    for fn in (evaluation.loss_sum, evaluation.chunked_loss_sum):
        model.zero_grad(set_to_none=True)
        loss = fn(model, batch)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if "lm_head.lora" in n}
        results.append((loss.detach(), grads))
    (want, want_grads), (got, got_grads) = results
    assert len(want_grads) == 2
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    for name, g in want_grads.items():
        assert (got_grads[name] - g).abs().max() <= 1e-6 * g.abs().max(), name


def test_a_batch_without_counted_tokens_gives_zero_and_touches_every_parameter(tokenizers):
    tok = tokenizers["chatml"][1]
    model = build_family("LlamaForCausalLM", tok).train()
    batch = collate([{"input_ids": [5, 6, 7], "labels": [X, X, X]}], pad_id=0)
    loss = evaluation.chunked_loss_sum(model, batch)
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize(
    ("ft", "family", "temperature"),
    [
        ("all_weights", "Gemma2ForCausalLM", 1.0),
        ("lora", "Gemma2ForCausalLM", 1.0),
        ("all_weights", "GraniteForCausalLM", 0.7),
        ("lora", "GraniteForCausalLM", 0.7),
    ],
)
def test_token_log_probs_equal_the_full_logits_values_and_gradients(
    ft, family, temperature, tokenizers, monkeypatch
):
    """Per-token log-probabilities through the chunked head (a policy-gradient loss's input)
    equal log_softmax of the model's own logits at the targets, 0 where nothing counts; a
    weighted sum of them has the same gradient as through the full logits. Gemma 2's soft cap
    and Granite's logits scaling, at a sampler's temperature; a frozen head (LoRA: the gradient
    made in forward) and a trained one (the chunk's logits made again in backward)."""
    import functools

    from tuneplex_automodel.model import apply_lora

    tok = tokenizers["chatml"][1]
    extra = {"final_logit_softcapping": 2.0} if family.startswith("Gemma") else {}
    if family.startswith("Granite"):
        extra = {"logits_scaling": 4.0}
    model = build_family(family, tok, **extra).train()
    if ft == "lora":
        model = apply_lora(model, rank=4, alpha=8, target_modules=None)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02)
    batch = packed_and_padded_batch(len(tok))
    vocab = model.get_output_embeddings().weight.shape[0]
    monkeypatch.setattr(linear_ce, "HEAD_CHUNK_ELEMENTS", vocab * 3)
    weights = torch.randn(batch["targets"].shape, generator=torch.Generator().manual_seed(1))
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def run(fn):
        model.zero_grad(set_to_none=True)
        logps = fn(model, batch)
        (logps * weights).sum().backward()
        return logps.detach(), {n: p.grad.clone() for n, p in trained if p.grad is not None}

    fused = linear_ce._fused_log_probs()
    calls = []
    monkeypatch.setattr(fused, "apply", functools.partial(_counting, fused.apply, calls))
    want, want_grads = run(
        functools.partial(evaluation._token_log_probs_of_logits, temperature=temperature)
    )
    got, got_grads = run(functools.partial(evaluation.token_log_probs, temperature=temperature))
    assert calls, "the plain head took the fused path"
    assert got.shape == batch["targets"].shape
    assert (got[batch["targets"] == X] == 0).all() and (got[batch["targets"] != X] < 0).all()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    if temperature == 1.0:
        rows = evaluation.sequence_log_probs(model, batch).detach()
        torch.testing.assert_close(rows, got.sum(-1), rtol=1e-6, atol=1e-6)
    assert got_grads.keys() == want_grads.keys() and len(got_grads) == len(trained)
    for name, g in want_grads.items():
        scale = g.abs().max().item()
        assert (got_grads[name] - g).abs().max().item() <= 1e-5 * scale + 1e-12, name


def _counting(apply, calls, *args):
    calls.append(1)
    return apply(*args)


def allocator_peak(fn) -> int:
    """Bytes allocated at most while `fn` runs, beyond what was allocated before it: the CPU
    allocator's events as torch's profiler records them (its memory timeline reads the same)."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    sizes, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        if event.tag == _EventType.Allocation:
            sizes.append((event.start_time_ns, event.extra_fields.alloc_size))
        stack.extend(event.children)
    now = peak = 0
    for _, size in sorted(sizes):
        now += size
        peak = max(peak, now)
    return peak


def test_under_bf16_autocast_a_tied_head_weight_is_held_once_in_bf16(monkeypatch):
    """Full weights, tied embeddings, bf16 autocast: the loss's forward holds the fp32 weight
    gradient and one bf16 copy of the head's weight, and nothing else the vocabulary's size
    (autocast's cache kept a second bf16 copy, made by the model's head call on no position;
    the weight gradient's bf16 product and its fp32 cast were vocabulary-sized)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab, hidden, n = 16384, 64, 64
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, intermediate_size=128, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).train()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    monkeypatch.setattr(linear_ce, "HEAD_CHUNK_ELEMENTS", vocab * 2)  # 2 tokens a chunk
    monkeypatch.setattr(linear_ce, "WEIGHT_GRAD_SLICE_ELEMENTS", vocab * hidden // 8)
    ids = torch.randint(0, vocab, (1, n))
    batch = {"input_ids": ids, "position_ids": torch.arange(n)[None], "targets": ids.roll(-1)}
    losses = []
    # oneDNN off: on a CPU with AMX its bf16 matmul packs the weight into a blocked copy of its
    # own (a library's scratch, not what this code holds), and that varies by CPU
    with warnings.catch_warnings(), torch.backends.mkldnn.flags(enabled=False):
        warnings.simplefilter("ignore")  # torch's note on TF32, which is about Intel GPUs
        peak = allocator_peak(
            lambda: losses.append(
                evaluation.chunked_loss_sum(model, batch, autocast=torch.bfloat16)
            )
        )
    weight = vocab * hidden
    chunk_logits = 2 * vocab * 4
    held = weight * 4 + weight * 2  # the fp32 gradient, one bf16 copy
    assert weight * 4 >= 32 * chunk_logits  # the head's weight dominates what a chunk makes
    assert peak <= held + weight * 4 // 8 * 2 + 6 * chunk_logits, (peak / weight, held / weight)
    losses[0].backward()
    assert model.lm_head.weight.grad is not None
