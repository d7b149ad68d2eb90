"""Reference figures without tuneplex's trainer: load a model with a loader and run a bare loop.

    python bench/bare_loop.py --model DIR --loader unsloth --bits 4 [--steps 20] [--warmup 5]
    python bench/bare_loop.py --model DIR --loader peft --bits 16

`--loader unsloth` is unsloth's FastLanguageModel (CUDA only); `--loader peft` is plain
transformers + peft (+ bitsandbytes for 4-bit). LoRA r16 on the 7 projection modules, random
token batches of `--micro` × `--seq`, AdamW, one forward/backward/step per iteration. Prints one
JSON line: tokens/s over the timed steps, peak CUDA memory, last loss.
"""

from __future__ import annotations

import argparse
import json
import time


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--loader", choices=["unsloth", "peft"], default="unsloth")
    ap.add_argument("--bits", type=int, choices=[4, 16], default=16)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    args = ap.parse_args(argv)

    from tuneplex.schema.loading import validate_job
    from tuneplex_unsloth.schema import UnslothJobInput

    model_section = {"name": args.model, "max_seq_length": args.seq, "load_in_4bit": args.bits == 4}
    job = validate_job(
        UnslothJobInput, {"model": model_section, "dataset": {"path": "unused.jsonl"}}
    )
    if args.loader == "unsloth":
        from tuneplex_unsloth.model import UnslothLoader as Loader
    else:
        from tuneplex_unsloth.model import PeftLoader as Loader
    loader = Loader()
    import torch

    model, _ = loader.load(job)
    model = loader.add_lora(model, job)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4, fused=torch.cuda.is_available())
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    tokens, seconds, loss = 0, 0.0, float("nan")
    for step in range(args.warmup + args.steps):
        ids = torch.randint(0, vocab, (args.micro, args.seq), generator=gen).to(device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = out.loss.item()
        dt = time.perf_counter() - t0
        if step >= args.warmup:
            tokens += ids.numel()
            seconds += dt
    result = {
        "loader": loader.name,
        "bits": args.bits,
        "tokens_per_s": round(tokens / seconds, 1),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3)
        if device.type == "cuda"
        else None,
        "loss": loss,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
