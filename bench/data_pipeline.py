"""Data pipeline throughput: N chat rows of ~300 tokens, tokenized and masked, then a cached rerun.

    python bench/data_pipeline.py [--rows 100000] [--template chatml|reasoning]
                                  [--workdir /tmp/tuneplex-bench-data] [--json out]

Everything is built locally: a byte-level BPE tokenizer and generated multi-turn conversations.
`--template chatml` renders them with ChatML, where every cut of a conversation renders as a
prefix of the whole; `--template reasoning` with a ChatML template that renders a `<think>` block
only after the last user message (as Qwen3's does), so the turns of multi-turn rows are located
by aligning renderings. Targets on a 2-core machine: first build < 60 s, cached rerun < 5 s.
The cached rerun is timed in a fresh process, as a second `tuneplex train` would see it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

# ChatML that renders a reasoning block only in assistant turns after the last user message
REASONING = (
    "{%- set ns = namespace(last=-1) %}"
    "{%- for m in messages %}{%- if m.role == 'user' %}{%- set ns.last = loop.index0 %}"
    "{%- endif %}{%- endfor %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if loop.index0 > ns.last %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{{- m.content + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
BUILD_TARGET_S = 60.0
CACHED_TARGET_S = 5.0


def make_rows(path: Path, n: int, seed: int = 0) -> None:
    from tuneplex.testing.tiny import sentence

    rng = random.Random(seed)
    with path.open("w") as fh:
        for _ in range(n):
            msgs = [{"role": "system", "content": sentence(rng)}]
            for _ in range(rng.choice((1, 2))):
                msgs.append({"role": "user", "content": " ".join(sentence(rng) for _ in range(5))})
                msgs.append(
                    {"role": "assistant", "content": " ".join(sentence(rng) for _ in range(12))}
                )
            fh.write(json.dumps({"messages": msgs}) + "\n")


def run_prepare(data: Path, tokenizer: Path, cache: Path, *, use_cache: bool) -> dict:
    """Time prepare() in a fresh interpreter (imports included, as a user would pay them)."""
    code = f"""
import json, time
t0 = time.perf_counter()
from tuneplex.data.pipeline import prepare
from tuneplex.data.spec import DataSpec
spec = DataSpec(train={str(data)!r}, tokenizer={str(tokenizer)!r}, max_seq_length=1024)
p = prepare(spec, use_cache={use_cache!r})
s = p.train.stats
print(json.dumps({{"seconds": time.perf_counter() - t0, "rows": s.rows, "tokens": s.tokens,
                   "trained": s.trained_tokens}}))
"""
    env = {**os.environ, "TUNEPLEX_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--template", choices=("chatml", "reasoning"), default="chatml")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/tuneplex-bench-data"))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    from tuneplex.testing.tiny import build_tokenizer

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    tok_dir = work / f"tokenizer-{args.template}"
    if not (tok_dir / "tokenizer.json").is_file():
        tok = build_tokenizer(tok_dir, style="chatml", vocab_size=2048)
        if args.template == "reasoning":
            tok.chat_template = REASONING
            tok.save_pretrained(tok_dir)
    data = work / f"chat-{args.rows}.jsonl"
    if not data.is_file():
        make_rows(data, args.rows)
    cache = work / "cache"
    shutil.rmtree(cache, ignore_errors=True)

    first = run_prepare(data, tok_dir, cache, use_cache=True)  # builds and writes the cache
    again = run_prepare(data, tok_dir, cache, use_cache=True)  # reads it
    rows = [
        ("build (tokenize + mask + write cache)", first["seconds"], BUILD_TARGET_S),
        ("cached rerun", again["seconds"], CACHED_TARGET_S),
    ]
    per_row = first["tokens"] / max(first["rows"], 1)
    print(
        f"{first['rows']} chat rows ({args.template} template), {per_row:.0f} tokens/row on "
        f"average, {first['trained']} trained of {first['tokens']} tokens, {os.cpu_count()} CPUs"
    )
    print(f"{'step':<40} {'seconds':>8} {'target':>8}  tokens/s")
    ok = True
    for name, secs, target in rows:
        flag = "" if secs < target else "  OVER TARGET"
        ok &= secs < target
        print(f"{name:<40} {secs:8.2f} {target:8.1f}  {first['tokens'] / secs:,.0f}{flag}")
    if args.json:
        args.json.write_text(json.dumps({"first": first, "cached": again}, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
