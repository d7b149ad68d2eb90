"""Greedy generation: tuneplex's batched engine against the tuning guide's one-prompt loop, on CPU.

    python bench/generate.py                                   # small shape, 64 prompts, 64 tokens
    python bench/generate.py --shape tiny --max-new-tokens 16 --batch-sizes 4,8
    python bench/generate.py --json out.json

Builds a random-init Llama (a byte-level BPE with a ChatML template; `--shape`) locally and loads
it in float32 with `AutoModelForCausalLM.from_pretrained`. `--prompts` user prompts of 3 to 60
words (seeded) are rendered once through the chat template by tuneplex's `Prompter`; both
contenders get those ids, its stop tokens, pad id and `--max-new-tokens`:

- the guide (automodel tuning guide, "Post-Training Evaluation with Hugging Face Generate"): one
  `model.generate(input_ids, attention_mask, max_new_tokens=N, do_sample=False)` per prompt,
  the answer read as `output[0][len(prompt):]`;
- tuneplex's `Generator.generate` (length-sorted, left-padded batches of each `--batch-sizes`).

Each runs one untimed warm-up generate first. Measured: generated tokens (stop tokens excluded)
per second of wall time, the speed-up over the guide, and how many completions are
token-identical to the guide's. For the first completion that differs, the position where it
diverges and the evidence: the guide's top-2 logit gap there (one forward pass on prompt +
common prefix), against the median top-2 gap over all of the guide's generated positions.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from pathlib import Path

SHAPES = {
    # hidden, layers, attention heads, kv heads, MLP size (the vocabulary is the tokenizer's, 512)
    "tiny": dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128),
    "small": dict(hidden=384, layers=4, heads=6, kv_heads=2, intermediate=1024),
}


# -- setup ------------------------------------------------------------------------------------
def build_model(out: Path, shape: str) -> None:
    from tuneplex.testing.tiny import build_llama, build_tokenizer

    if (out / "config.json").is_file():
        return
    tok = build_tokenizer(out, style="chatml")
    build_llama(out, tokenizer=tok, **SHAPES[shape])


def load(model_dir: Path):
    """(model in float32, eval mode; tokenizer; prompter rendering with its chat template)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from tuneplex.inference.prompts import Prompter
    from tuneplex.inference.target import _plain_spec

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, tok, Prompter(tok, _plain_spec(str(model_dir)))


def user_prompts(n: int, *, seed: int = 0) -> list[str]:
    from tuneplex.testing.tiny import WORDS

    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 60))) for _ in range(n)]


# -- the contenders ---------------------------------------------------------------------------
def guide_loop(model, prompts: list[list[int]], *, max_new_tokens: int, eos: list[int], pad: int):
    """The guide's loop, one prompt at a time; the raw generated ids (a stop token kept)."""
    import torch

    out = []
    for ids in prompts:
        inputs = {
            "input_ids": torch.tensor([ids]),
            "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
        }
        output = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=pad,
        )
        out.append(output[0][len(ids) :].tolist())
    return out


def cut(ids: list[int], stops: set[int]) -> tuple[list[int], bool]:
    """`ids` up to the first stop token (not kept), and whether there was one."""
    for k, t in enumerate(ids):
        if t in stops:
            return ids[:k], True
    return ids, False


def timed(fn) -> tuple[object, float]:
    t0 = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - t0


def run_guide(model, prompts, args, stop, pad) -> tuple[dict, list[list[int]]]:
    kw = dict(max_new_tokens=args.max_new_tokens, eos=list(stop.token_ids), pad=pad)
    guide_loop(model, prompts[:1], **kw)  # warm-up
    raw, wall = timed(lambda: guide_loop(model, prompts, **kw))
    done = [cut(r, set(stop.token_ids)) for r in raw]
    tokens = sum(len(ids) for ids, _ in done)
    row = {
        "contender": "guide",
        "batch_size": 1,
        "tokens": tokens,
        "stopped": sum(s for _, s in done),
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
    }
    return row, raw


def run_tuneplex(gen, prompts, args, batch_size: int):
    from tuneplex.inference.engine import Sampling

    sampling = Sampling(max_new_tokens=args.max_new_tokens)
    gen.generate(prompts[:batch_size], sampling, batch_size=batch_size)  # warm-up
    done, wall = timed(lambda: gen.generate(prompts, sampling, batch_size=batch_size))
    tokens = sum(len(c.ids) for c in done)
    row = {
        "contender": "tuneplex",
        "batch_size": batch_size,
        "tokens": tokens,
        "stopped": sum(c.stopped for c in done),
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
    }
    return row, done


# -- the evidence for a difference ------------------------------------------------------------
def top2_gaps(model, ids: list[int], start: int) -> list[float]:
    """Top-1 minus top-2 logit at each position from `start` on, predicting the next token (one
    forward pass, no KV cache)."""
    import torch

    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids])).logits[0, start - 1 : len(ids) - 1]
    top = logits.topk(2, dim=-1).values
    return (top[:, 0] - top[:, 1]).tolist()


def divergence(model, prompt: list[int], guide_raw: list[int], ours, stops: set[int]) -> dict:
    """Where a tuneplex completion first differs from the guide's, and how close the guide's
    pick was there: its top-2 logit gap, and its margin over the token tuneplex picked."""
    import torch

    mine, _ = cut(guide_raw, stops)
    pairs = enumerate(zip(mine, ours.ids, strict=False))
    k = next((i for i, (a, b) in pairs if a != b), min(len(mine), len(ours.ids)))
    picked = ours.ids[k] if k < len(ours.ids) else None  # None: tuneplex stopped (or ran out)
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([prompt + mine[:k]])).logits[0, -1]
    (v1, v2), (t1, t2) = logits.topk(2)
    guide_token = guide_raw[k] if k < len(guide_raw) else None
    margin = None
    if guide_token is not None and picked is not None:
        margin = float(logits[guide_token] - logits[picked])
    return {
        "position": k,
        "guide_token": guide_token,
        "tuneplex_token": picked,
        "top2_gap": float(v1 - v2),
        "top2_tokens": [int(t1), int(t2)],
        "guide_margin_over_tuneplex": margin,
    }


def compare(model, prompts, guide_raw, done, stops: set[int]) -> tuple[int, dict | None]:
    """(how many completions are token-identical to the guide's, the first difference)."""
    same = [cut(g, stops)[0] == c.ids for g, c in zip(guide_raw, done, strict=True)]
    first = next((i for i, s in enumerate(same) if not s), None)
    if first is None:
        return sum(same), None
    found = divergence(model, prompts[first], guide_raw[first], done[first], stops)
    return sum(same), {"prompt": first, **found}


# -- report -----------------------------------------------------------------------------------
def print_table(results: list[dict], header: str) -> None:
    print(header)
    print(
        f"{'contender':9} {'batch':>5} {'tokens':>7} {'stopped':>7} {'wall s':>7} "
        f"{'tokens/s':>9} {'speed÷guide':>11} {'identical':>9}"
    )
    n = results[0]["prompts"]
    for r in results:
        same = f"{r['identical']}/{n}"
        print(
            f"{r['contender']:9} {r['batch_size']:5} {r['tokens']:7} {r['stopped']:7} "
            f"{r['wall_s']:7.2f} {r['tokens_per_s']:9,.1f} {r['speed_vs_guide']:10.2f}× "
            f"{same:>9}"
        )


def header(args, model, prompts: list[list[int]]) -> str:
    import torch
    import transformers

    s = SHAPES[args.shape]
    lengths = [len(p) for p in prompts]
    params = sum(p.numel() for p in model.parameters()) / 1e6
    return (
        f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{torch.get_num_threads()} CPU threads, float32; shape {args.shape} (hidden "
        f"{s['hidden']}, {s['layers']} layers, vocab {model.config.vocab_size}, {params:.1f}M "
        f"parameters); {len(prompts)} prompts of {min(lengths)}-{max(lengths)} tokens "
        f"(mean {statistics.mean(lengths):.0f}), greedy, max_new_tokens {args.max_new_tokens}"
    )


def explain(results: list[dict], model, tok, prompts, guide_raw) -> None:
    """One line per batch size whose completions differ from the guide's, with the evidence."""
    differing = [r for r in results if r["first_difference"]]
    if not differing:
        return
    runs = zip(prompts, guide_raw, strict=True)
    median_gap = statistics.median(x for p, g in runs for x in top2_gaps(model, p + g, len(p)))
    for r in differing:
        r["median_top2_gap"] = median_gap
        print(describe(r, tok, median_gap))


def describe(r: dict, tok, median_gap: float) -> str:
    d = r["first_difference"]

    def show(t):
        return "a stop token" if t is None else f"{tok.decode([t])!r} ({t})"

    margin = d["guide_margin_over_tuneplex"]
    return (
        f"batch {r['batch_size']}: prompt {d['prompt']} first differs at generated token "
        f"{d['position']}: the guide picked {show(d['guide_token'])}, tuneplex "
        f"{show(d['tuneplex_token'])}; the guide's top-2 logit gap there is {d['top2_gap']:.2e}"
        + (f" (its pick leads tuneplex's by {margin:.2e})" if margin is not None else "")
        + f", against a median top-2 gap of {median_gap:.2e} over the guide's positions"
    )


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="small", choices=sorted(SHAPES))
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-sizes", default="8,16,64", help="tuneplex's, comma-separated")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--seed", type=int, default=0, help="of the prompts")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/tuneplex-bench-generate"))
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import transformers
    from tuneplex.inference.engine import Generator
    from tuneplex.progress import quiet_third_party_logs

    quiet_third_party_logs()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    work = args.workdir / args.shape
    build_model(work, args.shape)
    model, tok, prompter = load(work)
    prompts = [prompter.from_text(t).ids for t in user_prompts(args.prompts, seed=args.seed)]
    stop = prompter.stop
    gen = Generator(model, tok, stop=stop, device=torch.device("cpu"))
    stops = set(stop.token_ids)

    guide, guide_raw = run_guide(model, prompts, args, stop, gen.pad_id)
    results = [{**guide, "identical": len(prompts), "first_difference": None}]
    for b in (int(x) for x in args.batch_sizes.split(",")):
        row, done = run_tuneplex(gen, prompts, args, b)
        same, first = compare(model, prompts, guide_raw, done, stops)
        results.append({**row, "identical": same, "first_difference": first})
    for r in results:
        r["prompts"] = len(prompts)
        r["speed_vs_guide"] = r["tokens_per_s"] / guide["tokens_per_s"]

    print_table(results, header(args, model, prompts))
    explain(results, model, tok, prompts, guide_raw)
    if args.json:
        config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        config |= {"torch": torch.__version__, "threads": torch.get_num_threads()}
        args.json.write_text(json.dumps({"config": config, "results": results}, indent=2))
    return results


if __name__ == "__main__":
    main()
