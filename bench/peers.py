"""tuneplex vs transformers' Trainer vs a plain transformers + peft loop, on the same rows.

    python bench/peers.py --shape small --setups lora,full [--steps 6] [--warmup 2]
    python bench/peers.py --shape bigvocab --contenders tuneplex,trainer --json out.json
    python bench/peers.py --shape llama-1b --steps 20 --warmup 5      # a GPU
    python bench/peers.py --shape tiny --steps 2 --warmup 1           # CPU, seconds

Builds a random-init model of a named shape (train_throughput.py's builder) and synthetic
prompt/completion rows locally. Each contender then trains, in a fresh process of its own, one
after another: `tuneplex train` (automodel backend, its defaults), transformers' `Trainer` (its
defaults, but for the knobs that make the runs comparable), and a plain loop (forward with
`labels`, backward, clip, AdamW). All three get the same token ids and loss masks (tokenized
once by tuneplex's pipeline, `collate_for_hf` batches), in tuneplex's row order and micro-batches,
with the same seed before LoRA (r16, alpha 32, every linear layer but the head), AdamW (weight
decay 0.01 off 1-D parameters), grad clip 1.0 and learning rate (tuneplex's linear warmup then
cosine to 10%, as a LambdaLR). Precision: by default each contender's own (`--precision
defaults`: tuneplex's `auto` — bf16 autocast where the device computes bf16 natively, LoRA on a
bf16 base — and fp32 for Trainer and the loop, their defaults); `--precision auto|bf16|fp32`
gives every contender that one (tuneplex's decision, applied to the peers as tuneplex applies
it). `--warmup` optimizer steps run first, then `--steps` timed ones (as in
train_throughput.py): the speed is over the timed steps, the losses over all.

Measured per contender: real (non-padding) tokens/s from the end of step `--warmup` to the end
of the last step; peak memory (CUDA max allocated on a GPU, else the process's max RSS from
`os.wait4`); every step's loss; the process's wall time. One table, and `--json PATH`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import train_throughput as tt

ROW_TOKENS = {"tiny": 64, "small": 480, "bigvocab": 960, "llama-1b": 1024, "qwen3-0.6b": 1024}
CONTENDERS = ("tuneplex", "trainer", "loop")
LORA = {"rank": 16, "alpha": 32}


# -- the orchestrator ---------------------------------------------------------------------------
def build_rows(path: Path, model_dir: Path, *, rows: int, tokens: int, seed: int = 0) -> None:
    """Prompt/completion rows of 3/4 to 1 × `tokens` tokens (before the chat template)."""
    from transformers import AutoTokenizer
    from tuneplex.testing.tiny import sentence

    tok = AutoTokenizer.from_pretrained(model_dir)
    rng = random.Random(seed)
    with path.open("w") as fh:
        for _ in range(rows):
            want, parts, n = rng.randint(tokens * 3 // 4, tokens), [], 0
            while n < want:
                parts.append(sentence(rng))
                n += len(tok(parts[-1] + " ", add_special_tokens=False)["input_ids"])
            cut = max(1, len(parts) // 4)
            row = {"prompt": " ".join(parts[:cut]), "completion": " ".join(parts[cut:])}
            fh.write(json.dumps(row) + "\n")


def job_dict(work: Path, setup: str, args, contender: str = "tuneplex") -> dict:
    training = {"finetuning_type": "all_weights" if setup == "full" else "lora"}
    if setup == "lora":
        training["lora"] = dict(LORA)
    training["max_seq_length"] = args.row_tokens + 256  # nothing is truncated
    training["precision"] = precision_of(contender, args.precision)
    return {
        "model": str(work / "model"),
        "dataset": {"training": str(work / "data.jsonl")},
        "training": training,
        "schedule": {"max_steps": args.warmup + args.steps, "seed": args.seed},
        "batch": {"global_batch_size": args.global_batch, "micro_batch_size": args.micro_batch},
        "optimizer": {"learning_rate": args.lr, "warmup_steps": args.lr_warmup},
    }


def precision_of(contender: str, precision: str) -> str:
    """`--precision defaults`: tuneplex's own default (auto) and the peers' (fp32)."""
    if precision != "defaults":
        return precision
    return "auto" if contender == "tuneplex" else "fp32"


def warm_cache(job: dict) -> dict:
    """Tokenize the rows once, here (every contender then reads tuneplex's cache); their sizes."""
    from tuneplex.data.collate import RowTable
    from tuneplex.data.pipeline import prepare
    from tuneplex.schema.loading import validate_job
    from tuneplex_automodel.backend import AutomodelBackend
    from tuneplex_automodel.schema import AutomodelJobInput

    spec = AutomodelBackend().data_spec(validate_job(AutomodelJobInput, job))
    rows = RowTable(prepare(spec).train.dataset)
    return {
        "rows": len(rows),
        "mean_tokens": round(float(rows.lengths.mean()), 1),
        "max_tokens": int(rows.lengths.max()),
        "mean_targets": round(float(rows.target_counts.mean()), 1),
    }


def run_child(cmd: list[str], log: Path) -> tuple[float, float]:
    """Run `cmd` to its end; (wall seconds, its own max RSS in GiB). Fails with its log's tail."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = rc = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if rc != 0:
        tail = "\n".join(log.read_text().splitlines()[-30:])
        raise SystemExit(f"{' '.join(cmd)} failed (exit {rc}):\n{tail}")
    return wall, usage.ru_maxrss / 2**20  # KiB on Linux


def run_contender(work: Path, setup: str, contender: str, args) -> dict:
    job = work / f"job-{setup}-{contender}.yaml"  # JSON is YAML
    job.write_text(json.dumps(job_dict(work, setup, args, contender), indent=1))
    out = work / f"{contender}-{setup}"
    log = work / f"{contender}-{setup}.log"
    if contender == "tuneplex":
        cmd = [sys.executable, "-m", "tuneplex", "train", str(job), "-o", str(out), "--overwrite"]
    else:
        cmd = [sys.executable, __file__, "--worker", contender, "--job", str(job)]
        cmd += ["--warmup", str(args.warmup), "--out", str(out.with_suffix(".json"))]
    wall, rss = run_child(cmd, log)
    if contender == "tuneplex":
        r = tuneplex_result(out, args.warmup)
    else:
        r = json.loads(out.with_suffix(".json").read_text())
    peak = r.pop("cuda_peak_gib")
    r.update(
        setup=setup,
        contender=contender,
        wall_s=round(wall, 2),
        max_rss_gib=round(rss, 3),
        peak_memory_gib=peak if peak is not None else round(rss, 3),
        peak_memory_kind="cuda max allocated" if peak is not None else "process max RSS",
    )
    return r


def tuneplex_result(run: Path, warmup: int) -> dict:
    events = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [e for e in events if e["split"] == "train"]
    summary = json.loads((run / "summary.json").read_text())
    timed = train[warmup:]
    seconds = timed[-1]["elapsed_s"] - train[warmup - 1]["elapsed_s"]
    cuda = summary["peak_memory_kind"].startswith("cuda")
    return {
        "tokens_per_s": round(sum(e["tokens"] for e in timed) / seconds, 1),
        "losses": [e["loss"] for e in train],
        "device": summary["device"],
        "cuda_peak_gib": summary["peak_memory_gib"] if cuda else None,
    }


def print_table(results: list[dict], args, data: dict) -> None:
    s = tt.SHAPES[args.shape]
    n = args.warmup + args.steps
    print(
        f"shape {args.shape} (hidden {s['hidden']}, {s['layers']} layers, vocab {s['vocab']:,}); "
        f"{data['rows']} rows of {data['mean_tokens']:.0f} tokens on average (max "
        f"{data['max_tokens']}, {data['mean_targets']:.0f} in the loss); micro "
        f"{args.micro_batch}, global {args.global_batch}; {n} steps, speed over steps "
        f"{args.warmup + 1}-{n}; lr {args.lr:g} (warmup {args.lr_warmup}, cosine)"
    )
    print(f"peak memory: {results[0]['peak_memory_kind']}")
    print(
        f"{'setup':6} {'contender':9} {'device':17} {'tokens/s':>9} {'peak GiB':>9} "
        f"{'loss@1':>8} {'loss@' + str(n):>8} {'wall s':>7} {'speed÷Trainer':>14} "
        f"{'mem÷Trainer':>12} {'loss÷Trainer':>13}"
    )
    trainer = {r["setup"]: r for r in results if r["contender"] == "trainer"}
    for r in results:
        ref = trainer.get(r["setup"])
        speed = f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}×" if ref else "-"
        mem = f"{r['peak_memory_gib'] / ref['peak_memory_gib']:.2f}×" if ref else "-"
        last = f"{r['losses'][-1] / ref['losses'][-1]:.4f}" if ref else "-"
        r["speed_vs_trainer"] = speed
        r["memory_vs_trainer"] = mem
        r["last_loss_vs_trainer"] = last
        print(
            f"{r['setup']:6} {r['contender']:9} {r['device']:17} {r['tokens_per_s']:9,.0f} "
            f"{r['peak_memory_gib']:9.2f} {r['losses'][0]:8.4f} {r['losses'][-1]:8.4f} "
            f"{r['wall_s']:7.1f} {speed:>14} {mem:>12} {last:>13}"
        )


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="tiny", choices=sorted(tt.SHAPES))
    ap.add_argument("--setups", default="lora,full", help="lora, full")
    ap.add_argument("--contenders", default=",".join(CONTENDERS), help=", ".join(CONTENDERS))
    ap.add_argument("--steps", type=int, default=6, help="timed optimizer steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--global-batch", type=int, default=8)
    ap.add_argument("--row-tokens", type=int, default=None, help="longest row (default: shape's)")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--lr-warmup", type=int, default=2, help="learning-rate warmup steps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--precision",
        default="defaults",
        choices=["defaults", "auto", "bf16", "fp32"],
        help="defaults: each contender's own; else every contender's",
    )
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/tuneplex-bench-peers"))
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--worker", choices=CONTENDERS[1:], help=argparse.SUPPRESS)
    ap.add_argument("--job", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.worker, args.job, warmup=args.warmup, out=args.out)
        return []
    if args.warmup < 1 or args.steps < 1:
        ap.error("--warmup and --steps must be at least 1")
    if args.global_batch % args.micro_batch:
        ap.error("--global-batch must be a multiple of --micro-batch")
    args.row_tokens = args.row_tokens or ROW_TOKENS.get(args.shape, 1024)
    work = args.workdir / args.shape
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TUNEPLEX_CACHE", str(args.workdir / "cache"))
    tt.build_model(work / "model", args.shape)
    rows = args.global_batch * (args.warmup + args.steps)
    build_rows(work / "data.jsonl", work / "model", rows=rows, tokens=args.row_tokens)
    data = warm_cache(job_dict(work, "full", args))
    results = []
    for setup in args.setups.split(","):
        for contender in args.contenders.split(","):
            t0 = time.perf_counter()
            results.append(run_contender(work, setup, contender, args))
            print(f"[{setup} {contender}: {time.perf_counter() - t0:.0f} s]", file=sys.stderr)
    print_table(results, args, data)
    if args.json:
        config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        report = {"config": config, "data": data, "results": results}
        args.json.write_text(json.dumps(report, indent=2))
    return results


# -- the peers, each in its own process ---------------------------------------------------------
def worker(contender: str, job_path: Path, *, warmup: int, out: Path) -> None:
    """Train the job with `contender` on tuneplex's rows, in tuneplex's order; write the result."""
    import numpy as np
    import torch
    from tuneplex.data.collate import RowTable
    from tuneplex.data.pipeline import prepare
    from tuneplex.nn.evaluation import pad_id_of
    from tuneplex.schema.loading import validate_job
    from tuneplex_automodel.backend import AutomodelBackend
    from tuneplex_automodel.plan import TrainPlan, learning_rate
    from tuneplex_automodel.schema import AutomodelJobInput
    from tuneplex_automodel.trainer import pick_runtime

    job = validate_job(AutomodelJobInput, json.loads(job_path.read_text()))
    prepared = prepare(AutomodelBackend().data_spec(job))  # tuneplex's cached tokens
    rows = RowTable(prepared.train.dataset)
    pad_id = pad_id_of(prepared.tokenizer)
    seed, opt = job.schedule.seed, job.optimizer
    batch = job.batch
    plan = TrainPlan(
        len(rows), batch.global_batch_size, batch.micro_batch_size, epochs=1,
        max_steps=job.schedule.max_steps, seed=seed, val_check_interval=None,
        checkpoint_steps=None,
    )  # fmt: skip
    steps = plan.epoch_steps(0)[: plan.total_steps]  # micro-batches of row indices, per step

    cuda = torch.cuda.is_available()
    # tuneplex's precision decision (bf16 autocast where native: LoRA on a bf16 base)
    runtime = pick_runtime(job, torch.device("cuda" if cuda else "cpu"))
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # before LoRA, as tuneplex
    model = load(job, dtype=runtime.dtype, device=runtime.device)
    total, peak = plan.total_steps, opt.learning_rate
    factors = [
        learning_rate(i, peak=peak, warmup_steps=opt.warmup_steps, total_steps=total) / peak
        for i in range(total + 1)
    ]  # tuneplex's schedule, as LambdaLR's factors
    lr_lambda = factors.__getitem__
    step_tokens = [int(rows.lengths[flat(m)].sum()) for m in steps]
    run = run_trainer if contender == "trainer" else run_loop
    losses, ends = run(
        model, rows, steps, job=job, pad_id=pad_id, lr_lambda=lr_lambda, runtime=runtime, out=out
    )
    result = {
        "tokens_per_s": round(sum(step_tokens[warmup:]) / (ends[-1] - ends[warmup - 1]), 1),
        "losses": losses,
        "device": runtime.label,
        "cuda_peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None,
    }
    out.write_text(json.dumps(result))


def flat(step: list[list[int]]) -> list[int]:
    """A step's row indices, micro-batch after micro-batch."""
    return [i for micro in step for i in micro]


def load(job, *, dtype, device):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(job.model, dtype=dtype).to(device)
    model.config.use_cache = False
    lora = job.training.lora
    if lora is None:
        return model
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=0.0,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def run_trainer(model, rows, steps, *, job, pad_id, lr_lambda, runtime, out):
    """transformers' Trainer with its defaults, but for batch, accumulation, steps, learning
    rate and its schedule, weight decay (tuneplex's 0.01), seed and row order."""
    import torch
    from torch.optim.lr_scheduler import LambdaLR
    from torch.utils.data import SequentialSampler
    from transformers import Trainer, TrainerCallback, TrainingArguments
    from tuneplex.data.collate import collate_for_hf

    losses, ends = [], []
    cuda = runtime.device.type == "cuda"

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            ends.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    class InOrder(Trainer):
        def _get_train_sampler(self, train_dataset=None):
            return SequentialSampler(train_dataset or self.train_dataset)

        def create_scheduler(self, num_training_steps, optimizer=None):
            if self.lr_scheduler is None:
                self.lr_scheduler = LambdaLR(optimizer or self.optimizer, lr_lambda)
            return self.lr_scheduler

    micro = job.batch.micro_batch_size
    args = TrainingArguments(
        output_dir=str(out.with_suffix("")),
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=job.batch.global_batch_size // micro,
        max_steps=len(steps),
        learning_rate=job.optimizer.learning_rate,
        weight_decay=job.optimizer.weight_decay,
        seed=job.schedule.seed,
        bf16=runtime.autocast is not None,  # torch.autocast, on a GPU or a CPU
        use_cpu=not cuda,  # what bf16 on a CPU asks for
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        remove_unused_columns=False,
    )
    ordered = rows.take([i for step in steps for i in flat(step)])
    trainer = InOrder(
        model=model,
        args=args,
        train_dataset=ordered,
        data_collator=lambda batch: collate_for_hf(batch, pad_id=pad_id),
        callbacks=[Clock()],
    )
    trainer.train()
    return losses, ends


def run_loop(model, rows, steps, *, job, pad_id, lr_lambda, runtime, out):
    """A plain loop: forward with `labels` (the model's own loss, normalised by the step's
    counted tokens), backward, clip to 1.0, AdamW, LambdaLR."""
    import contextlib

    import torch
    from torch.optim.lr_scheduler import LambdaLR
    from tuneplex.data.collate import collate_for_hf

    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": job.optimizer.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    device = runtime.device
    fused = device.type == "cuda" or None
    optimizer = torch.optim.AdamW(groups, lr=job.optimizer.learning_rate, fused=fused)
    scheduler = LambdaLR(optimizer, lr_lambda)
    autocast = (
        torch.autocast(device.type, dtype=runtime.autocast)
        if runtime.autocast is not None
        else contextlib.nullcontext()
    )
    losses, ends = [], []
    for step in steps:
        n_items = int(rows.target_counts[flat(step)].sum())
        total = torch.zeros((), device=device)
        for micro in step:
            batch = collate_for_hf(rows.take(micro), pad_id=pad_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            with autocast:
                loss = model(**batch, use_cache=False, num_items_in_batch=n_items).loss
            loss.backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total.item())
        ends.append(time.perf_counter())
    return losses, ends


if __name__ == "__main__":
    main()
