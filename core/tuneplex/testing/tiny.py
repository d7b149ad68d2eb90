"""Tiny tokenizers and models built locally, for the demo, the tests and the CPU benchmarks.

Nothing is downloaded: a byte-level BPE is trained with `tokenizers` on generated text and
wrapped as a transformers fast tokenizer with one of three real-world chat template styles.
"""

from __future__ import annotations

import random
from pathlib import Path

WORDS = [
    "the",
    "a",
    "model",
    "learns",
    "data",
    "token",
    "answer",
    "question",
    "river",
    "mountain",
    "blue",
    "green",
    "small",
    "large",
    "fast",
    "slow",
    "code",
    "python",
    "function",
    "returns",
    "value",
    "list",
    "sum",
    "add",
    "multiply",
    "weather",
    "city",
    "paris",
    "london",
    "sunny",
    "rainy",
    "today",
    "tomorrow",
    "please",
    "thanks",
    "hello",
    "world",
    "why",
    "how",
    "what",
    "when",
    "where",
    "who",
    "because",
    "train",
    "test",
    "loss",
    "rate",
    "step",
    "batch",
    "number",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
]

CHATML = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n' }}{%- for tool in tools %}{{- tool | tojson }}{{- '\\n' }}{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role != 'system' %}"
    "{{- '<|im_start|>' + message.role + '\\n' }}"
    "{%- if message.content %}{{- message.content }}{%- endif %}"
    "{%- for call in message.tool_calls or [] %}"
    "{{- '\\n<tool_call>' }}{{- (call.function or call) | tojson }}{{- '</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

LLAMA3 = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message.role + '<|end_header_id|>\\n\\n' }}"
    "{{- message.content or '' }}"
    "{%- for call in message.tool_calls or [] %}{{- (call.function or call) | tojson }}"
    "{%- endfor %}"
    "{{- '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)

# Mistral-7B-Instruct-v0.1's template, verbatim in behaviour: [INST] ... [/INST] answer</s>
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}"
    "{% endif %}{% endfor %}"
)

STYLES = {
    "chatml": {"template": CHATML, "bos": None, "eos": "<|im_end|>", "add_bos": False},
    "llama3": {
        "template": LLAMA3,
        "bos": "<|begin_of_text|>",
        "eos": "<|eot_id|>",
        "add_bos": True,
    },
    "mistral": {"template": MISTRAL, "bos": "<s>", "eos": "</s>", "add_bos": True},
}
SPECIALS = [
    "<pad>",
    "<s>",
    "</s>",
    "<|im_start|>",
    "<|im_end|>",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]


def sentence(rng: random.Random, n: int | None = None) -> str:
    words = [rng.choice(WORDS) for _ in range(n or rng.randint(4, 14))]
    return " ".join(words).capitalize() + rng.choice([".", "?", "!"])


def corpus(rng: random.Random, lines: int = 3000) -> list[str]:
    extra = [
        "[INST]",
        "[/INST]",
        "<tool_call>",
        "</tool_call>",
        '{"name": "get_weather"}',
        "system",
        "user",
        "assistant",
        "tool",
        "# Tools",
    ]
    return [sentence(rng) + " " + rng.choice(extra) + " " + sentence(rng) for _ in range(lines)]


def build_tokenizer(
    out_dir: str | Path,
    *,
    style: str | dict = "chatml",
    vocab_size: int = 512,
    seed: int = 0,
    texts: list[str] | None = None,
):
    """Train a byte-level BPE on generated text (plus `texts`); save a fast tokenizer with a
    chat template. `style`: a name in STYLES, or a dict like theirs (template, bos, eos,
    add_bos) with the template's markers under "specials"."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    cfg = STYLES[style] if isinstance(style, str) else style
    specials = list(dict.fromkeys([*SPECIALS, *cfg.get("specials", ())]))
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tk.train_from_iterator(corpus(random.Random(seed)) + (texts or []), trainer=trainer)
    if cfg["add_bos"]:
        bos = cfg["bos"]
        tk.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A",
            pair=f"{bos} $A {bos} $B",
            special_tokens=[(bos, tk.token_to_id(bos))],
        )
    else:
        tk.post_processor = processors.ByteLevel(trim_offsets=False)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token=cfg["bos"],
        eos_token=cfg["eos"],
        pad_token="<pad>",
        chat_template=cfg["template"],
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(out)
    return tok


def build_llama(
    out_dir: str | Path,
    *,
    tokenizer=None,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    seed: int = 0,
    max_positions: int = 4096,
    init_std: float = 0.02,
):
    """A random-init LlamaForCausalLM (fp32, safetensors) sized for CPU tests.

    `init_std` above the usual 0.02 gives the random output head a logit range like a trained
    model's, so an adapter (which cannot rescale the head) has room to learn on it.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        **_decoder_args(tokenizer, hidden, layers, heads, kv_heads, max_positions, init_std),
        intermediate_size=intermediate,
    )
    return _save(LlamaForCausalLM, config, out_dir, tokenizer, seed)


def build_moe(
    out_dir: str | Path,
    *,
    family: str = "qwen3_moe",
    tokenizer=None,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    experts: int = 4,
    experts_per_token: int = 2,
    moe_intermediate: int = 64,
    seed: int = 0,
    max_positions: int = 4096,
    init_std: float = 0.02,
):
    """A random-init mixture-of-experts model, `family` "qwen3_moe" (Qwen3MoeForCausalLM) or
    "mixtral" (MixtralForCausalLM), every layer a mixture of experts; the router's auxiliary
    loss is off so the loss is the cross-entropy alone."""
    import transformers

    common = {
        **_decoder_args(tokenizer, hidden, layers, heads, kv_heads, max_positions, init_std),
        "num_experts_per_tok": experts_per_token,
        "output_router_logits": False,
    }
    if family == "qwen3_moe":
        config = transformers.Qwen3MoeConfig(
            **common,
            intermediate_size=2 * moe_intermediate,  # dense MLP size; unused with no dense layers
            moe_intermediate_size=moe_intermediate,
            num_experts=experts,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[],
        )
        cls = transformers.Qwen3MoeForCausalLM
    elif family == "mixtral":
        config = transformers.MixtralConfig(
            **common,
            intermediate_size=moe_intermediate,  # Mixtral's experts take this size
            num_local_experts=experts,
        )
        cls = transformers.MixtralForCausalLM
    else:
        raise ValueError(f"family: {family!r} is not one of qwen3_moe, mixtral")
    return _save(cls, config, out_dir, tokenizer, seed)


def _decoder_args(tokenizer, hidden, layers, heads, kv_heads, max_positions, init_std) -> dict:
    return {
        "vocab_size": len(tokenizer) if tokenizer is not None else 512,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "max_position_embeddings": max_positions,
        "initializer_range": init_std,
        "tie_word_embeddings": False,
        "bos_token_id": getattr(tokenizer, "bos_token_id", None),
        "eos_token_id": getattr(tokenizer, "eos_token_id", None),
        "pad_token_id": getattr(tokenizer, "pad_token_id", None),
    }


def _save(model_class, config, out_dir, tokenizer, seed: int):
    """Build with a fixed seed in fp32; write safetensors (and the tokenizer) to `out_dir`."""
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(seed)
    model = model_class(config)
    out = Path(out_dir)
    model.save_pretrained(out, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return model


def main(argv: list[str] | None = None) -> None:
    """`python -m tuneplex.testing.tiny DIR`: a tiny tokenizer + Llama model directory, built
    locally."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m tuneplex.testing.tiny", description=main.__doc__)
    ap.add_argument("out", help="directory to write (config.json, safetensors, tokenizer)")
    ap.add_argument("--style", default="chatml", choices=sorted(STYLES))
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--intermediate", type=int, default=128)
    ap.add_argument("--init-std", type=float, default=0.02)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    from tuneplex.progress import quiet_third_party_logs

    quiet_third_party_logs()
    tok = build_tokenizer(args.out, style=args.style, vocab_size=args.vocab, seed=args.seed)
    build_llama(
        args.out,
        tokenizer=tok,
        hidden=args.hidden,
        layers=args.layers,
        heads=args.heads,
        kv_heads=args.kv_heads,
        intermediate=args.intermediate,
        seed=args.seed,
        init_std=args.init_std,
    )
    print(f"tiny model and tokenizer in {args.out}")


if __name__ == "__main__":
    main()
