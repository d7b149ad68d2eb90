"""Time and peak memory of `tuneplex export`, on a random-init model of a named shape, on CPU.

    python bench/export.py                                    # small: gguf f32/f16/q8_0/q4_0, hf
    python bench/export.py --shape tiny --formats gguf:f32,gguf:q4_0

Builds the model as bench/train_throughput.py does (float32 safetensors, a byte-level BPE with
the Llama 3 template) and runs `tuneplex export MODEL --format F --dtype D -o OUT` once per
format, each in a fresh process whose peak RSS comes from `os.wait4` (loading included). For
GGUF, another process loads the model, reads every weight, and times `write_gguf` alone with
its RSS sampled: what writing adds to a model in memory, beside the model's size (its
parameters in float32).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
FORMATS = "gguf:f32,gguf:f16,gguf:q8_0,gguf:q4_0,hf:f32"
WRITER = """
import json, resource, sys, threading, time
from pathlib import Path
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from tuneplex.export.gguf import write_gguf

def rss():
    return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()

model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
tok = AutoTokenizer.from_pretrained(sys.argv[1])
[float(p.sum()) for p in model.parameters()]  # every weight resident before writing
before, most, done = rss(), [0], threading.Event()

def watch():
    while not done.wait(0.002):
        most[0] = max(most[0], rss())

watcher = threading.Thread(target=watch)
watcher.start()
start = time.perf_counter()
write_gguf(model=model, tokenizer=tok, out=Path(sys.argv[3]), dtype=sys.argv[2],
           chat_template=tok.chat_template, eos_ids=[tok.eos_token_id])
seconds = time.perf_counter() - start
done.set()
watcher.join()
params = sum(p.numel() for p in model.parameters())
print(json.dumps({"seconds": seconds, "before": before, "during": max(most[0], rss()),
                  "parameters": params}))
"""
"""write_gguf alone, on a loaded model whose weights were all read (loading may map the file
and leave pages unread): RSS before writing, and its largest value while writing (sampled
every 2 ms)."""


def measured(argv: list[str], *, log: Path) -> tuple[float, int, int]:
    """(wall seconds, peak RSS bytes, exit code) of one child process."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with log.open("w") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    return wall, usage.ru_maxrss * 1024, os.waitstatus_to_exitcode(status)


def size_of(path: Path) -> int:
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size


def run(shape: str, formats: list[str], workdir: Path) -> list[dict]:
    sys.path.insert(0, str(BENCH))
    from train_throughput import build_model

    model = workdir / f"model-{shape}"
    build_model(model, shape)
    rows = []
    for spec in formats:
        fmt, _, dtype = spec.partition(":")
        out = workdir / (f"out-{dtype}.gguf" if fmt == "gguf" else f"out-{dtype}-hf")
        cmd = [sys.executable, "-m", "tuneplex", "export", str(model), "--format", fmt]
        cmd += ["--dtype", dtype, "-o", str(out), "--overwrite"]
        log = workdir / f"{fmt}-{dtype}.log"
        wall, peak, code = measured(cmd, log=log)
        assert code == 0, log.read_text()[-2000:]
        row = {"what": f"{fmt} {dtype}", "seconds": wall, "peak_rss": peak}
        row["written"] = size_of(out)
        if fmt == "gguf":
            log = workdir / f"writer-{dtype}.log"
            argv = [sys.executable, "-c", WRITER, str(model), dtype, str(workdir / "w.gguf")]
            _, _, code = measured(argv, log=log)
            assert code == 0, log.read_text()[-2000:]
            row["writer"] = json.loads(log.read_text().strip().splitlines()[-1])
        rows.append(row)
    params = next(r["writer"]["parameters"] for r in rows if "writer" in r)
    for r in rows:
        r.update(shape=shape, parameters=params, model_bytes=4 * params)
    return rows


def table(rows: list[dict], command: str) -> str:
    mib = 1 << 20
    first = rows[0]
    lines = [
        f"`{command}` — shape {first['shape']}: {first['parameters'] / 1e6:.1f}M parameters, "
        f"{first['model_bytes'] / mib:.0f} MiB in float32; CPU, {os.cpu_count()} cores",
        "",
        "| format | export s | export peak RSS MiB | write s | RSS before write MiB "
        "| most while writing MiB | added by writing MiB | written MiB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        w = r.get("writer")
        writer = ["", "", "", ""]
        if w is not None:
            added = (w["during"] - w["before"]) / mib
            writer = [
                f"{w['seconds']:.1f}",
                f"{w['before'] / mib:.0f}",
                f"{w['during'] / mib:.0f}",
                f"{added:+.0f}",
            ]
        cells = [r["what"], f"{r['seconds']:.1f}", f"{r['peak_rss'] / mib:.0f}", *writer]
        lines.append("| " + " | ".join([*cells, f"{r['written'] / mib:.0f}"]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="small", help="a shape of bench/train_throughput.py")
    ap.add_argument("--formats", default=FORMATS, help="FORMAT:DTYPE, comma-separated")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/tuneplex-bench-export"))
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    rows = run(args.shape, args.formats.split(","), args.workdir)
    command = "python bench/export.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(table(rows, command.strip()))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
