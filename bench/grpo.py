"""GRPO on CPU: tuneplex against TRL's GRPOTrainer and a plain transformers + peft loop.

    python bench/grpo.py --shape tiny --setup both --steps 10 --warmup 2
    python bench/grpo.py --shape small --setup both --steps 3 --warmup 1
    python bench/grpo.py --shape tiny --steps 2 --warmup 1 --contenders trl,loop   # seconds

Builds a random-init model locally (`tiny`: a 2-layer Llama with the ChatML tokenizer, as the
tests' `tiny_model`; `small`: train_throughput.py's 50M shape, 32k vocabulary, whose tokenizer
knows 512 ids, so most sampled ids decode to nothing), prompt rows `{"prompt": ...}` and a reward
file (`a_share`: the share of a completion's letters that are a or A). Each contender then
trains, in a fresh process of its own, one after another, on the same settings: fp32, the same
seed before the model (and LoRA: r16, alpha 32, every linear layer but the head), the same
prompts (rendered by tuneplex's pipeline; TRL's own rendering is checked against them),
`--prompts` prompts × `--generations` sampled completions (temperature 1, no top-p or top-k) of
at most the shape's completion length per step, the group's mean as baseline and its standard
deviation as scale, β = 0 (no reference model), one policy update per batch of rollouts, AdamW
(lr `--lr`, weight decay 0.01, grad clip 1.0, tuneplex's schedule: no warmup, cosine to 10%),
8 completions per training forward and backward (`--micro-batch`; TRL's default
`per_device_train_batch_size` and tuneplex's grpo default, gradients accumulated over a step):

- `tuneplex`: `tuneplex train job.yaml` (automodel backend, training_type grpo), precision fp32;
  `tuneplex-ac`: the same with activation checkpointing (`full`), as TRL's default;
  `tuneplex-auto`: the same job as `tuneplex` at tuneplex's default precision (`auto`);
- `trl`: TRL's `GRPOTrainer`, its defaults for the rest (gradient checkpointing on);
  `trl-no-gc`: the same with gradient checkpointing off, as the others. TRL (1.15, 1.16) computes
  log-probabilities through a Triton kernel (`trl.trainer.utils._ChunkedLogProbFunction`),
  which fails on a CPU ("0 active drivers"); in its process it is replaced by
  `TorchChunkedLogProb`, the same outputs in plain torch (chunks of 512 tokens, each chunk's
  logits recomputed in backward);
- `loop`: a plain loop: `model.generate` (sampling), reward, advantages, per-token
  log-probabilities of the completions, loss −mean(A · exp(logp − logp.detach())), AdamW.

`--warmup` steps run first, then `--steps` timed ones: steps/s over the timed steps; where each
step's time goes (generation; reward and advantages; the policy update: log-probabilities, loss,
backward, optimizer), from tuneplex's metrics.jsonl (`elapsed_s`, `generation_s`,
`training_s`) and from timers in the peers' processes; peak memory is the process's max RSS
(`os.wait4`). One markdown table, and `--json PATH`.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import random
import statistics
import sys
import time
from pathlib import Path

import peers
import train_throughput as tt

COMPLETION_TOKENS = {"tiny": 8, "small": 64}
CONTENDERS = ("trl", "trl-no-gc", "loop", "tuneplex", "tuneplex-ac", "tuneplex-auto")
SETUPS = {"lora": "lora", "full": "all_weights"}  # --setup -> tuneplex's finetuning_type
LOGPROB_TOKENS = 512  # tokens per chunk of TorchChunkedLogProb
REWARD = '''"""The bench's reward: the share of a completion's letters that are a or A."""


def a_share(prompts, completions, **kw):
    out = []
    for completion in completions:
        if isinstance(completion, list):  # TRL's conversational completions
            completion = completion[-1]["content"]
        letters = [c for c in completion.lower() if c.isalpha()]
        out.append(letters.count("a") / len(letters) if letters else 0.0)
    return out
'''


# -- the orchestrator ---------------------------------------------------------------------------
def build_model(out: Path, shape: str) -> None:
    if shape != "tiny":
        tt.build_model(out, shape)
        return
    from tuneplex.testing.tiny import build_llama, build_tokenizer

    if (out / "config.json").is_file():
        return
    tok = build_tokenizer(out, style="chatml")  # tests/conftest.py's tiny_model
    build_llama(out, tokenizer=tok, hidden=64, layers=2, init_std=0.1)


def build_prompts(path: Path, *, rows: int, seed: int = 0) -> None:
    """Rows of one 12-word sentence each (prompts of about the same length)."""
    from tuneplex.testing.tiny import sentence

    rng = random.Random(seed)
    path.write_text("".join(json.dumps({"prompt": sentence(rng, 12)}) + "\n" for _ in range(rows)))


def job_dict(
    work: Path, setup: str, args, *, precision: str = "fp32", checkpointing: str = "none"
) -> dict:
    training = {
        "training_type": "grpo",
        "finetuning_type": SETUPS[setup],
        "precision": precision,
        "activation_checkpointing": checkpointing,
        "max_seq_length": 256,
        "grpo": {
            "environment": {"name": "python", "function": f"{work / 'reward.py'}:a_share"},
            "num_prompts_per_step": args.prompts,
            "num_generations_per_prompt": args.generations,
            "max_completion_length": args.completion_tokens,
            "ref_policy_kl_penalty": 0.0,
            "use_rloo": False,  # the group's mean as baseline, as TRL and the loop
            "generation_temperature": 1.0,
            "generation_top_p": 1.0,
            "generation_top_k": None,
        },
    }
    if setup == "lora":
        training["lora"] = dict(peers.LORA)
    return {
        "model": str(work / "model"),
        "dataset": {"training": str(work / "prompts.jsonl")},
        "training": training,
        "batch": {"micro_batch_size": args.micro_batch},
        "schedule": {"max_steps": args.warmup + args.steps, "seed": args.seed},
        "optimizer": {"learning_rate": args.lr, "warmup_steps": 0},
    }


def rendered_prompts(job: dict) -> tuple[list[list[int]], list[str]]:
    """The prompts as tuneplex renders them (ids with the generation prompt), and as written."""
    from tuneplex.data.pipeline import prepare
    from tuneplex.schema.loading import validate_job
    from tuneplex_automodel.backend import AutomodelBackend
    from tuneplex_automodel.schema import AutomodelJobInput

    data = prepare(AutomodelBackend().data_spec(validate_job(AutomodelJobInput, job))).train
    return [list(map(int, x)) for x in data.dataset["input_ids"]], list(data.dataset["prompt"])


def run_contender(work: Path, setup: str, contender: str, args) -> dict:
    precision = "auto" if contender == "tuneplex-auto" else "fp32"
    checkpointing = "full" if contender == "tuneplex-ac" else "none"
    job = work / f"job-{setup}-{contender}.yaml"  # JSON is YAML
    spec = job_dict(work, setup, args, precision=precision, checkpointing=checkpointing)
    job.write_text(json.dumps(spec, indent=1))
    out = work / f"{contender}-{setup}"
    log = work / f"{contender}-{setup}.log"
    if contender.startswith("tuneplex"):
        cmd = [sys.executable, "-m", "tuneplex", "train", str(job), "-o", str(out), "--overwrite"]
    else:
        cmd = [sys.executable, __file__, "--worker", contender, "--job", str(job)]
        cmd += ["--warmup", str(args.warmup), "--out", str(out.with_suffix(".json"))]
    row = {"setup": setup, "contender": contender, "precision": precision}
    before = cpu_times()
    try:
        wall, rss = peers.run_child(cmd, log)
    except SystemExit as exc:  # the contender failed: its row says why, the others still run
        lines = [x for x in str(exc).splitlines() if x.strip()]
        return {**row, "error": lines[-1] if lines else "failed", "log": str(log)}
    if contender.startswith("tuneplex"):
        r = tuneplex_result(out, args.warmup)
        used = r["device"].split(", ")[-1]  # what `auto` chose on this machine
        row["precision"] = precision if used == precision else f"{precision} ({used})"
    else:
        r = json.loads(out.with_suffix(".json").read_text())
    row["others_cpu"] = others_share(before, cpu_times())  # others' work skews the speed
    return {**row, **r, "wall_s": round(wall, 1), "peak_rss_gib": round(rss, 3), "log": str(log)}


def cpu_times() -> tuple[float, float, float]:
    """(the machine's CPU seconds, of them busy, of them this process's waited-for children)."""
    with open("/proc/stat") as fh:
        ticks = [int(x) for x in fh.readline().split()[1:9]]
    hz, t = os.sysconf("SC_CLK_TCK"), os.times()
    return (
        sum(ticks) / hz,
        (sum(ticks) - ticks[3] - ticks[4]) / hz,
        t.children_user + t.children_system,
    )


def others_share(before: tuple, after: tuple) -> float:
    """The share of the machine's CPU time that other processes took between two cpu_times()."""
    total, busy, mine = (b - a for a, b in zip(before, after, strict=True))
    return max(busy - mine, 0.0) / total if total > 0 else 0.0


def tuneplex_result(run: Path, warmup: int) -> dict:
    """Speed and breakdown from the run's metrics.jsonl: `elapsed_s` is counted from the start
    of training; `generation_s` and `training_s` are each step's own."""
    events = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [e for e in events if e.get("split") == "train"]
    timed = train[warmup:]
    seconds = timed[-1]["elapsed_s"] - train[warmup - 1]["elapsed_s"]
    summary = json.loads((run / "summary.json").read_text())
    step_s = seconds / len(timed)
    parts = {
        name: statistics.mean(e[key] for e in timed)
        for name, key in (
            ("generation_s", "generation_s"),
            ("training_s", "training_s"),
        )
    }
    parts["reward_s"] = statistics.mean(e["scoring_s"] + e.get("reference_s", 0.0) for e in timed)
    return {
        "steps_per_s": len(timed) / seconds,
        "step_s": step_s,
        **parts,
        "other_s": step_s - sum(parts.values()),
        "rewards": [e["reward"] for e in train],
        "completion_tokens": statistics.mean(e["completion_length"] for e in timed),
        "zero_advantage": statistics.mean(e["zero_advantage_fraction"] for e in timed),
        "device": summary.get("device"),
        "tuneplex_peak_gib": summary.get("peak_memory_gib"),
    }


def print_table(results: list[dict], args) -> None:
    s = tt.SHAPES[args.shape]
    threads = f"{args.threads or torch_threads()} CPU threads of {os.cpu_count()}"
    print(
        f"shape {args.shape} (hidden {s['hidden']}, {s['layers']} layers, vocab "
        f"{args.vocab:,}, {args.parameters / 1e6:.1f}M parameters); {args.prompts} prompts × "
        f"{args.generations} generations × at most {args.completion_tokens} tokens per step, "
        f"training micro-batch {args.micro_batch}; {args.warmup + args.steps} steps, speed over "
        f"steps {args.warmup + 1}-{args.warmup + args.steps}; {threads}; "
        f"peak memory: process max RSS; tuneplex {tuneplex_version()}; {versions()}\n"
    )
    head = (
        "| setup | contender | precision | steps/s | s/step | generation s | reward+adv s | "
        "update s | other s | peak RSS GiB | speed ÷ TRL | memory ÷ TRL | tokens/completion "
        "| zero-adv | reward first → last | others' CPU |"
    )
    print(head)
    print("|" + "---|" * head.count(" | ") + "---|")
    trl = {r["setup"]: r for r in results if r["contender"] == "trl" and "error" not in r}
    for r in results:
        if "error" in r:
            cells = [r["setup"], r["contender"], r["precision"], f"failed: {r['error']}"]
            print("| " + " | ".join(cells) + " |" + " |" * 12)
            continue
        ref = trl.get(r["setup"])
        r["speed_vs_trl"] = r["steps_per_s"] / ref["steps_per_s"] if ref else None
        r["memory_vs_trl"] = r["peak_rss_gib"] / ref["peak_rss_gib"] if ref else None
        cells = [
            r["setup"],
            r["contender"],
            r["precision"],
            f"{r['steps_per_s']:.3f}",
            f"{r['step_s']:.3f}",
            f"{r['generation_s']:.3f}",
            number(r.get("reward_s"), ".3f"),
            f"{r['training_s']:.3f}",
            f"{r['other_s']:.3f}",
            f"{r['peak_rss_gib']:.2f}",
            number(r["speed_vs_trl"], ".2f", "×"),
            number(r["memory_vs_trl"], ".2f", "×"),
            number(r.get("completion_tokens"), ".1f"),
            f"{r['zero_advantage']:.2f}",
            f"{r['rewards'][0]:.3f} → {r['rewards'][-1]:.3f}",
            f"{100 * r['others_cpu']:.0f}%",
        ]
        print("| " + " | ".join(cells) + " |")
    notes = [
        "TRL: trl.trainer.utils._ChunkedLogProbFunction (Triton) replaced by plain torch "
        "(TorchChunkedLogProb) in its process; trl: TRL's default gradient checkpointing "
        "(on), trl-no-gc: off (as the loop and tuneplex); tuneplex-ac: tuneplex's activation "
        "checkpointing on (full)",
        "generation s, reward+adv s, update s: seconds per timed step (tuneplex: its "
        "generation_s, scoring_s + reference_s, training_s; TRL: _generate_single_turn, the "
        "rest of _generate_and_score_completions, the rest of the step to on_step_end); "
        "other s: what is left of the step (optimizer step and logging for tuneplex)",
        "zero-adv: share of completions with advantage 0 (a group of equal rewards; TRL and "
        "the loop: of groups); tuneplex leaves them out of forward and backward at β = 0 "
        "(their gradient is 0), TRL and the loop train on them",
        f"others' CPU: the share of the machine's CPU time ({os.cpu_count()} cores) that other "
        "processes took while the contender ran; above a few % its speed is not its own",
    ]
    for r in results:
        if "prompts_match" in r and not r["prompts_match"]:
            notes.append(f"{r['contender']} {r['setup']}: prompt ids differ from tuneplex's")
        if "error" in r:
            notes.append(f"{r['contender']} {r['setup']}: log in {r['log']}")
    print("\n" + "\n".join(f"- {n}" for n in notes))


def run_all(work: Path, setups: list[str], contenders: list[str], args) -> list[dict]:
    """Every contender on every setup, `--repeats` times interleaved (a busy spell of the
    machine slows them all); the fastest run of each."""
    runs: dict[tuple[str, str], list[dict]] = {(s, c): [] for s in setups for c in contenders}
    saved = os.environ.get("OMP_NUM_THREADS")
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the contenders' processes read it
    try:
        for setup in setups:
            for repeat in range(args.repeats):
                for contender in contenders:
                    t0 = time.perf_counter()
                    runs[setup, contender].append(run_contender(work, setup, contender, args))
                    took = time.perf_counter() - t0
                    print(f"[{setup} {contender} #{repeat + 1}: {took:.0f} s]", file=sys.stderr)
    finally:
        if saved is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = saved
    return [best(each) for each in runs.values()]


def best(runs: list[dict]) -> dict:
    """The fastest of a contender's runs (a failure if any failed), with every run's speed."""
    failed = [r for r in runs if "error" in r]
    if failed:
        return failed[0]
    fastest = max(runs, key=lambda r: r["steps_per_s"])
    return {**fastest, "runs_steps_per_s": [r["steps_per_s"] for r in runs]}


def number(x: float | None, fmt: str, unit: str = "") -> str:
    return "-" if x is None else f"{x:{fmt}}{unit}"


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="tiny", choices=sorted(COMPLETION_TOKENS))
    ap.add_argument("--setup", default="both", choices=["lora", "full", "both"])
    ap.add_argument("--contenders", default=",".join(CONTENDERS), help=", ".join(CONTENDERS))
    ap.add_argument("--steps", type=int, default=6, help="timed steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--prompts", type=int, default=4, help="prompts per step")
    ap.add_argument("--generations", type=int, default=8, help="completions per prompt")
    ap.add_argument("--completion-tokens", type=int, default=None, help="default: the shape's")
    ap.add_argument(
        "--micro-batch",
        type=int,
        default=8,
        help="completions per training forward and backward (default 8: TRL's "
        "per_device_train_batch_size and tuneplex's grpo default)",
    )
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of each run")
    ap.add_argument("--repeats", type=int, default=1, help="runs of each; the fastest is shown")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/tuneplex-bench-grpo"))
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--worker", choices=["trl", "trl-no-gc", "loop"], help=argparse.SUPPRESS)
    ap.add_argument("--job", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.worker, args.job, warmup=args.warmup, out=args.out)
        return []
    if args.warmup < 1 or args.steps < 1:
        ap.error("--warmup and --steps must be at least 1")
    unknown = set(args.contenders.split(",")) - set(CONTENDERS)
    if unknown:
        ap.error(f"--contenders: {', '.join(sorted(unknown))} not among {', '.join(CONTENDERS)}")
    args.completion_tokens = args.completion_tokens or COMPLETION_TOKENS[args.shape]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = args.workdir / args.shape
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TUNEPLEX_CACHE", str(args.workdir / "cache"))
    build_model(work / "model", args.shape)
    build_prompts(work / "prompts.jsonl", rows=args.prompts * (args.warmup + args.steps))
    (work / "reward.py").write_text(REWARD)
    describe_model(work / "model", args)
    setups = ["lora", "full"] if args.setup == "both" else [args.setup]
    results = run_all(work, setups, args.contenders.split(","), args)
    print_table(results, args)
    print("\n    " + " ".join(["python", "bench/grpo.py", *(argv or sys.argv[1:])]))
    if args.json:
        config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        args.json.write_text(json.dumps({"config": config, "results": results}, indent=2))
    return results


def tuneplex_version() -> str:
    """Where tuneplex is imported from, and its checkout's commit (the code moves)."""
    import importlib.util
    import subprocess

    where = Path(importlib.util.find_spec("tuneplex").origin).parent
    git = ["git", "-C", str(where), "describe", "--always", "--dirty", "--exclude", "*"]
    commit = subprocess.run(git, capture_output=True, text=True).stdout.strip()
    return f"from {where}" + (f" at {commit}" if commit else "")


def versions() -> str:
    """The peers' versions: TRL's speed and memory move between its releases."""
    from importlib.metadata import version

    return ", ".join(f"{d} {version(d)}" for d in ("torch", "transformers", "peft", "trl"))


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def describe_model(model_dir: Path, args) -> None:
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        args.parameters = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118
        args.vocab = f.get_slice("lm_head.weight").get_shape()[0]


# -- the peers, each in its own process ---------------------------------------------------------
def worker(contender: str, job_path: Path, *, warmup: int, out: Path) -> None:
    """Train the job's GRPO with `contender` on tuneplex's rendered prompts; write the result."""
    import numpy as np
    import torch
    from transformers import AutoTokenizer
    from tuneplex.inference.rewards import load_python_reward
    from tuneplex.schema.loading import validate_job
    from tuneplex_automodel.plan import learning_rate
    from tuneplex_automodel.schema import AutomodelJobInput

    raw = json.loads(job_path.read_text())
    job = validate_job(AutomodelJobInput, raw)
    ids, texts = rendered_prompts(raw)
    grpo = job.training.grpo
    reward = load_python_reward(grpo.environment.function, base_dir=Path.cwd(), key="reward")
    tok = AutoTokenizer.from_pretrained(job.model)
    seed, total = job.schedule.seed, job.schedule.max_steps
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # before LoRA, as tuneplex
    model = peers.load(job, dtype=torch.float32, device=torch.device("cpu"))
    model.config.use_cache = True  # generation keeps its KV cache
    peak = job.optimizer.learning_rate
    factors = [
        learning_rate(i, peak=peak, warmup_steps=0, total_steps=total) / peak
        for i in range(total + 1)
    ]  # tuneplex's schedule, as LambdaLR's factors
    run = run_loop
    if contender.startswith("trl"):
        run = functools.partial(run_trl, gradient_checkpointing=contender == "trl")
    steps, extra = run(
        model, tok, ids, texts, reward.function, job=job, lr_lambda=factors.__getitem__
    )
    timed = steps[warmup:]
    seconds = timed[-1]["end"] - steps[warmup - 1]["end"]
    step_s = seconds / len(timed)
    parts = {
        k: statistics.mean(s[k] for s in timed) for k in ("generation_s", "reward_s", "training_s")
    }
    result = {
        "steps_per_s": len(timed) / seconds,
        "step_s": step_s,
        **parts,
        "other_s": step_s - sum(parts.values()),
        "rewards": [s["reward"] for s in steps],
        "completion_tokens": statistics.mean(s["completion_tokens"] for s in timed),
        "zero_advantage": statistics.mean(s["zero_advantage"] for s in timed),
        "device": "cpu",
        **extra,
    }
    out.write_text(json.dumps(result))


def run_loop(model, tok, ids, texts, reward, *, job, lr_lambda):
    """The plain loop; one record per step (its end, its parts' seconds, reward, length)."""
    import torch
    from torch.optim.lr_scheduler import LambdaLR

    grpo, micro = job.training.grpo, job.batch.micro_batch_size
    n_prompts, n_gen = grpo.num_prompts_per_step, grpo.num_generations_per_prompt
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=job.optimizer.learning_rate, weight_decay=0.01)
    scheduler = LambdaLR(optimizer, lr_lambda)
    steps = []
    for step in range(job.schedule.max_steps):
        t0 = time.perf_counter()
        batch = slice(step * n_prompts, (step + 1) * n_prompts)
        seq, attention, mask = sample(model, tok, ids[batch], n_gen, grpo.max_completion_length)
        completion = seq[:, -mask.shape[1] :]
        done = tok.batch_decode(completion.masked_fill(~mask, tok.pad_token_id), True)
        t1 = time.perf_counter()
        prompts = [t for t in texts[batch] for _ in range(n_gen)]
        rewards = torch.tensor(reward(prompts=prompts, completions=done), dtype=torch.float32)
        group = rewards.view(n_prompts, n_gen)
        flat = (group.std(1) == 0).float().mean().item()  # groups with nothing to learn
        advantages = (group - group.mean(1, keepdim=True)) / (group.std(1, keepdim=True) + 1e-4)
        advantages = advantages.view(-1, 1)
        t2 = time.perf_counter()
        positions = (attention.cumsum(1) - 1).clamp(min=0)
        for rows in torch.arange(len(seq)).split(micro):
            logits = model(
                input_ids=seq[rows], attention_mask=attention[rows], position_ids=positions[rows],
                logits_to_keep=completion.shape[1] + 1, use_cache=False,
            ).logits[:, :-1]  # fmt: skip
            logp = logits.float().log_softmax(-1).gather(-1, completion[rows, :, None])[..., 0]
            ratio = torch.exp(logp - logp.detach())
            loss = -(advantages[rows] * ratio * mask[rows]).sum() / mask.sum()
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        end = time.perf_counter()
        lengths = mask.sum(1).float()
        steps.append(
            {"end": end, "generation_s": t1 - t0, "reward_s": t2 - t1, "training_s": end - t2}
            | {"reward": rewards.mean().item(), "completion_tokens": lengths.mean().item()}
            | {"zero_advantage": flat}
        )
    return steps, {}


def sample(model, tok, batch: list[list[int]], n_gen: int, max_new_tokens: int):
    """`n_gen` sampled completions of each prompt (left-padded): (prompt + completion ids, their
    attention mask, the completions' mask: up to and with the first EOS)."""
    import torch

    pad, eos, width = tok.pad_token_id, tok.eos_token_id, max(map(len, batch))
    prompt = torch.tensor([[pad] * (width - len(p)) + p for p in batch])
    prompt_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
    with torch.no_grad():
        seq = model.generate(
            input_ids=prompt.repeat_interleave(n_gen, 0),
            attention_mask=prompt_mask.repeat_interleave(n_gen, 0),
            do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=max_new_tokens,
            eos_token_id=eos, pad_token_id=pad, use_cache=True,
        )  # fmt: skip
    is_eos = (seq[:, width:] == eos).long()
    mask = (is_eos.cumsum(1) - is_eos) == 0
    attention = torch.cat([prompt_mask.repeat_interleave(n_gen, 0), mask.long()], dim=1)
    return seq, attention, mask


def run_trl(model, tok, ids, texts, reward, *, job, lr_lambda, gradient_checkpointing: bool):
    """TRL's GRPOTrainer, its defaults but for the settings the contenders share (and
    `gradient_checkpointing`, on by TRL's default); one record per step, and whether TRL's
    rendering of the prompts gives tuneplex's ids."""
    import torch
    import trl.trainer.utils as trl_utils
    from datasets import Dataset
    from torch.optim.lr_scheduler import LambdaLR
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    trl_utils._ChunkedLogProbFunction = TorchChunkedLogProb  # Triton: no CPU
    grpo, total = job.training.grpo, job.schedule.max_steps
    samples, micro = grpo.samples_per_step, job.batch.micro_batch_size
    chat = [[{"role": "user", "content": t}] for t in texts]
    theirs = tok.apply_chat_template(chat[0], add_generation_prompt=True, tokenize=True)
    clock: dict[str, float] = {}
    steps, logs = [], []

    def timed(name, method, *a, **kw):
        t0 = time.perf_counter()
        try:
            return method(*a, **kw)
        finally:
            clock[name] = clock.get(name, 0.0) + time.perf_counter() - t0

    class Timed(GRPOTrainer):
        def _generate_single_turn(self, *a, **kw):
            return timed("generation_s", super()._generate_single_turn, *a, **kw)

        def _generate_and_score_completions(self, *a, **kw):
            return timed("scored_s", super()._generate_and_score_completions, *a, **kw)

        def create_scheduler(self, num_training_steps, optimizer=None):
            if self.lr_scheduler is None:
                self.lr_scheduler = LambdaLR(optimizer or self.optimizer, lr_lambda)
            return self.lr_scheduler

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            clock.clear()
            clock["begin"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            end = time.perf_counter()
            scored = clock.get("scored_s", 0.0)
            steps.append(
                {
                    "end": end,
                    "generation_s": clock.get("generation_s", 0.0),
                    "reward_s": scored - clock.get("generation_s", 0.0),
                    "training_s": end - clock["begin"] - scored,
                }
            )

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "reward" in logs:
                logs_seen.append(logs)

    logs_seen = logs
    config = GRPOConfig(
        output_dir=str(Path(job.model).parent / "trl-out"),
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=samples // micro,
        num_generations=grpo.num_generations_per_prompt,
        max_completion_length=grpo.max_completion_length,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        beta=0.0,
        num_iterations=1,
        scale_rewards="group",
        learning_rate=job.optimizer.learning_rate,
        weight_decay=0.01,
        max_grad_norm=1.0,
        max_steps=total,
        seed=job.schedule.seed,
        shuffle_dataset=False,
        bf16=False,  # TRL's default is True; fp32 as the others
        gradient_checkpointing=gradient_checkpointing,
        use_cpu=True,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )
    trainer = Timed(
        model=model,
        reward_funcs=[reward],
        args=config,
        train_dataset=Dataset.from_list([{"prompt": c} for c in chat]),
        processing_class=tok,
        callbacks=[Clock()],
    )
    trainer.train()
    for step, log in zip(steps, logs, strict=True):
        step["reward"] = log["reward"]
        step["completion_tokens"] = log["completions/mean_length"]
        step["zero_advantage"] = log["frac_reward_zero_std"]
    extra = {
        "prompts_match": list(theirs["input_ids"]) == ids[0],
        "gradient_checkpointing": config.gradient_checkpointing,
        "torch_threads": torch.get_num_threads(),
    }
    return steps, extra


class TorchChunkedLogProb:
    """`trl.kernels.ChunkedLogProbFunction.apply` in plain torch, for a CPU: per-token
    log-probabilities of `hidden @ weight.T` (logit scale, soft-capping, temperature) and the
    optional outputs asked for, in chunks of LOGPROB_TOKENS tokens whose logits are recomputed
    in backward (torch.utils.checkpoint), so no [tokens, vocabulary] tensor is kept."""

    @staticmethod
    def apply(
        hidden, weight, bias, targets, temperature, chunk_size, softcap, logit_scale, outputs
    ):
        import torch
        from torch.utils.checkpoint import checkpoint

        names = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
        asked = tuple(name for name in names if name in outputs)  # and always the log-probs
        n = hidden.shape[0]
        parts = [
            checkpoint(
                _logprob_chunk, hidden[i : i + LOGPROB_TOKENS], weight, bias,
                targets[i : i + LOGPROB_TOKENS], temperature, softcap, logit_scale, asked,
                use_reentrant=False,
            )
            for i in range(0, max(n, 1), LOGPROB_TOKENS)
        ]  # fmt: skip
        joined = [torch.cat(x) for x in zip(*parts, strict=True)]
        logprobs, extra = joined[0], dict(zip(asked, joined[1:], strict=True))
        return (logprobs, *(extra.get(name) for name in names))


def _logprob_chunk(hidden, weight, bias, targets, temperature, softcap, logit_scale, asked):
    import torch

    dtype = torch.promote_types(hidden.dtype, torch.float32)  # fp32 at least, as TRL's kernel
    z = hidden.to(dtype) @ weight.to(dtype).t()
    if bias is not None:
        z = z + bias.to(dtype)
    z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z = z / temperature
    log_z = torch.logsumexp(z, dim=-1)
    log_p = z - log_z[:, None]
    out = [log_p.gather(-1, targets[:, None])[:, 0]]
    for name in asked:
        if name == "entropy":
            out.append(-(log_p.exp() * log_p).sum(-1))
        elif name == "log_sum_sq_probs":
            out.append(torch.logsumexp(2 * log_p, dim=-1).detach())
        elif name == "mean_logits":
            out.append(z.mean(-1).detach())
        elif name == "is_top1":
            out.append(z.argmax(-1) == targets)
    return tuple(out)


if __name__ == "__main__":
    main()
