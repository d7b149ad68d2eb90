"""Training throughput and memory of `tuneplex train`, on a random-init model of a named shape.

    python bench/train_throughput.py --shape llama-1b --setups lora,full [--steps 20] [--warmup 5]
    python bench/train_throughput.py --shape tiny --steps 3 --warmup 1     # CPU, seconds

Builds the model (random init, safetensors, bf16 on a GPU) and a synthetic dataset of long text
rows locally, runs `tuneplex train --backend automodel` once per setup in a fresh process, and
prints one table: real (non-padding) tokens/s over the steps after warm-up, peak memory (CUDA max
allocated, or the process's max RSS on CPU), MFU on a GPU, and the loss of the last step.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
from pathlib import Path

SHAPES = {
    # hidden, layers, heads, kv heads, intermediate, vocab, tied embeddings
    "tiny": dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=512, tied=False),
    "llama-1b": dict(
        hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192, vocab=128256, tied=True
    ),
    "qwen3-0.6b": dict(
        hidden=1024, layers=28, heads=16, kv_heads=8, intermediate=3072, vocab=151936, tied=True
    ),
    # CPU shapes of peers.py: a 50M model, and a small one with a 128k vocabulary
    "small": dict(
        hidden=512, layers=8, heads=8, kv_heads=4, intermediate=1408, vocab=32000, tied=False
    ),
    "bigvocab": dict(
        hidden=256, layers=4, heads=4, kv_heads=2, intermediate=704, vocab=128256, tied=True
    ),
}
SETUPS = {
    # automodel backend
    "lora": "training: {finetuning_type: lora, lora: {rank: 16, alpha: 32}}",
    "full": "training: {finetuning_type: all_weights}",
    # unsloth backend (CUDA only): LoRA r16 on the 7 projection modules
    "unsloth-4bit": "model: {load_in_4bit: true}",
    "unsloth-16bit": "model: {load_in_4bit: false}",
}
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def build_model(out: Path, shape: str) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM
    from tuneplex.testing.tiny import build_tokenizer

    if (out / "config.json").is_file():
        return
    s = SHAPES[shape]
    build_tokenizer(out, style="llama3")
    common = dict(
        vocab_size=s["vocab"],
        hidden_size=s["hidden"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["kv_heads"],
        intermediate_size=s["intermediate"],
        tie_word_embeddings=s["tied"],
        max_position_embeddings=8192,
    )
    if shape.startswith("qwen3"):
        config, cls = Qwen3Config(**common, head_dim=128), Qwen3ForCausalLM
    else:
        config, cls = LlamaConfig(**common), LlamaForCausalLM
    gpu = torch.cuda.is_available()
    dtype = torch.bfloat16 if gpu else torch.float32
    config.dtype = dtype
    torch.manual_seed(0)
    with torch.device("cuda" if gpu else "cpu"):
        model = cls(config).to(dtype)
    model.save_pretrained(out, safe_serialization=True)


def build_data(path: Path, *, rows: int, seq: int) -> None:
    from tuneplex.testing.tiny import sentence

    rng = random.Random(0)
    with path.open("w") as fh:
        for _ in range(rows):
            text = " ".join(sentence(rng) for _ in range(seq // 4))  # > seq tokens: truncated
            fh.write(json.dumps({"text": text}) + "\n")


def job_text(work: Path, setup: str, args) -> tuple[str, list[str]]:
    """(job YAML, extra CLI arguments) for one setup."""
    steps = args.warmup + args.steps
    if setup.startswith("unsloth"):
        bits = "true" if setup.endswith("4bit") else "false"
        return (
            f"model: {{name: {work / 'model'}, max_seq_length: {args.seq}, load_in_4bit: {bits}}}\n"
            f"dataset: {{path: {work / 'data.jsonl'}}}\n"
            f"schedule: {{max_steps: {steps}, seed: 0}}\n"
            f"batch: {{per_device_train_batch_size: {args.micro}}}\n"
            "optimizer: {learning_rate: 1.0e-4, optim: adamw_torch_fused}\n",
            ["--backend", "unsloth"],
        )
    return (
        f"model: {work / 'model'}\n"
        f"dataset: {{training: {work / 'data.jsonl'}}}\n"
        f"{SETUPS[setup]}\n"
        f"schedule: {{max_steps: {steps}, seed: 0}}\n"
        f"batch: {{global_batch_size: {args.micro}, micro_batch_size: {args.micro}}}\n"
        "optimizer: {learning_rate: 1.0e-4}\n",
        ["--set", f"training.max_seq_length={args.seq}"],
    )


def run_setup(work: Path, setup: str, args) -> dict:
    run = work / f"run-{setup}"
    job = work / f"job-{setup}.yaml"
    text, extra = job_text(work, setup, args)
    job.write_text(text)
    cmd = [sys.executable, "-m", "tuneplex", "train", str(job), "-o", str(run), "--overwrite"]
    cmd += extra
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{setup}: tuneplex train failed:\n{proc.stderr or proc.stdout}")
    events = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    timed = [e for e in events if e["split"] == "train" and e["step"] > args.warmup]
    tokens = sum(e["tokens"] for e in timed)
    seconds = sum(e["tokens"] / e["tokens_per_s"] for e in timed)
    summary = json.loads((run / "summary.json").read_text())
    return {
        "setup": setup,
        "tokens_per_s": tokens / seconds,
        "peak_memory_gib": summary["peak_memory_gib"],
        "peak_memory_kind": summary["peak_memory_kind"],
        "final_loss": timed[-1]["loss"],
        "trainable_parameters": summary["trainable_parameters"],
        "total_parameters": summary["total_parameters"],
        "device": summary["device"],
    }


def mfu(result: dict, shape: str) -> float | None:
    """Model FLOPs utilisation: 6·N·tokens (+ attention) over the GPU's bf16 peak; LoRA counts
    the frozen weights' backward-to-input (4·N) only."""
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in result["device"]), None)
    if peak is None:
        return None
    s = SHAPES[shape]
    n = result["total_parameters"]
    per_token = (6 if result["setup"] == "full" else 4) * n  # LoRA: no weight gradients
    per_token += 12 * s["layers"] * s["hidden"] * SEQ_FOR_MFU / 2  # causal attention
    return result["tokens_per_s"] * per_token / (peak * 1e12)


SEQ_FOR_MFU = 2048


def main(argv: list[str] | None = None) -> list[dict]:
    global SEQ_FOR_MFU
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
    ap.add_argument("--setups", default="lora,full", help=", ".join(SETUPS))
    ap.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    ap.add_argument("--micro", type=int, default=4, help="rows per step (one micro-batch)")
    ap.add_argument("--seq", type=int, default=2048, help="tokens per row")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/tuneplex-bench-train"))
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    SEQ_FOR_MFU = args.seq
    work = args.workdir / args.shape
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TUNEPLEX_CACHE", str(args.workdir / "cache"))
    build_model(work / "model", args.shape)
    build_data(work / "data.jsonl", rows=args.micro * (args.steps + args.warmup), seq=args.seq)
    results = [run_setup(work, s, args) for s in args.setups.split(",")]
    print(
        f"shape {args.shape}, micro batch {args.micro} × {args.seq} tokens, "
        f"{args.steps} timed steps after {args.warmup}; device {results[0]['device']}"
    )
    print(f"{'setup':8} {'tokens/s':>10} {'peak GiB':>9} {'MFU':>6} {'loss':>8}  trainable")
    for r in results:
        m = mfu(r, args.shape)
        r["mfu"] = m
        print(
            f"{r['setup']:8} {r['tokens_per_s']:10,.0f} {r['peak_memory_gib']:9.2f} "
            f"{(f'{100 * m:.1f}%' if m is not None else '-'):>6} {r['final_loss']:8.4f}  "
            f"{r['trainable_parameters']:,} of {r['total_parameters']:,}"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
