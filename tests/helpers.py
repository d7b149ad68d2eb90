"""Helpers shared by the training tests (plain functions; fixtures live in conftest.py)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import yaml
from tuneplex.cli import main
from tuneplex.runs import read_metrics


def chat_rows(n: int, *, seed: int = 0) -> list[dict]:
    """A small 'reverse the words' chat task over the tiny tokenizer's vocabulary."""
    from tuneplex.testing.tiny import WORDS

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [rng.choice(WORDS[:30]) for _ in range(rng.randint(3, 6))]
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": "Reverse: " + " ".join(words)},
                    {"role": "assistant", "content": " ".join(reversed(words))},
                ]
            }
        )
    return rows


def write_rows(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def merge_yaml(base: str, extra: str) -> str:
    """`base` with the top-level sections of `extra` merged in (one level deep)."""
    doc = yaml.safe_load(base)
    for key, value in (yaml.safe_load(extra) or {}).items():
        if isinstance(value, dict) and isinstance(doc.get(key), dict):
            doc[key].update(value)
        else:
            doc[key] = value
    return yaml.safe_dump(doc)


def train(capsys, *args) -> tuple[int, str, str]:
    """`tuneplex train ARGS` in-process: (exit code, stdout, stderr)."""
    code = main(["train", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


def losses(run, split="train") -> list[float]:
    return [e["loss"] for e in read_metrics(run) if e["split"] == split]


def cli(*args, check=True, env=None):
    """`tuneplex train ARGS` in a subprocess (the launcher starts the workers)."""
    proc = subprocess.run(
        [sys.executable, "-m", "tuneplex", "train", *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
        timeout=600,
    )
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def assert_same_run(a, b, rel=1e-5):
    ea, eb = read_metrics(a), read_metrics(b)
    assert [(e["step"], e["split"]) for e in ea] == [(e["step"], e["split"]) for e in eb]
    for x, y in zip(ea, eb, strict=True):
        assert math.isclose(x["loss"], y["loss"], rel_tol=rel), (x, y)
        if x["split"] == "train":
            assert math.isclose(x["grad_norm"], y["grad_norm"], rel_tol=1e-4), (x, y)
            assert x["tokens"] == y["tokens"]


def assert_same_final(a, b) -> None:
    """final/ of run `b` holds run `a`'s weights, up to what fp32 rounding can explain.

    The runs start from the same weights and differ in the order of fp32 sums. AdamW divides
    each step by √v, so an element whose gradient is within rounding of zero steps by up to
    ~lr either way: no constant tolerance holds on every CPU. Per tensor, with w0 where
    training started (`initial_weights`):
    - every element of each run lies within `adamw_reach` of w0 (which checks w0 too), and
      the runs within twice that of each other: all AdamW can do whatever the gradients (a
      permuted or mis-sharded tensor is not);
    - leaving out its `outliers(n)` largest differences (the near-zero-gradient elements),
      ||w_b − w_a|| ≤ BULK_REL × ||w_a − w0||, the distance training moved the tensor.
    """
    assert _train_lrs(a) == _train_lrs(b), "the runs took different learning rates"
    init, reach = initial_weights(a), adamw_reach(a)
    x, y = final_weights(a), final_weights(b)
    assert x.keys() == y.keys() and x, (sorted(x), sorted(y))
    assert x.keys() <= init.keys(), sorted(x.keys() - init.keys())
    for k in sorted(x):
        _assert_same_tensor(k, x[k], y[k], init[k], reach)


ATOL = 1e-6
"""fp32 representation noise of weights of size ~1."""
BULK_REL = 1e-2
"""An untrained, stale, permuted or partly trained tensor (one stale expert of 8) is at 0.3 or
more; every parallel proof here is at 4e-5 or less (without leaving outliers out: 1.5e-3)."""


def outliers(n: int) -> int:
    """How many of a tensor's n elements may differ by up to the optimizer's bound: rounding
    decides only elements whose gradient is within noise of zero, rare (no element beyond 1%
    of the bound in any proof here; one at 1% in issue 14), where a bug moves a whole shard,
    row block or expert."""
    return max(2, n // 1000)


def _assert_same_tensor(name: str, x, y, w0, reach: AdamWReach) -> None:
    import torch

    x, y, w0 = (t.to(torch.float32).flatten() for t in (x, y, w0))
    limit = reach(w0) + ATOL
    for run, w in (("a", x), ("b", y)):
        beyond = ((w - w0).abs() - limit).max()
        assert beyond <= 0, f"{name}: run {run} is {beyond:.3g} beyond AdamW's reach from w0"
    diff = (y - x).abs()
    bound = 2 * reach.steps + ATOL
    assert diff.max() <= bound, f"{name}: differs by {diff.max():.3g} > {bound:.3g}"
    bulk = diff.sort().values[: diff.numel() - outliers(diff.numel())].norm()
    moved = (x - w0).norm()
    assert bulk <= BULK_REL * moved + ATOL * diff.numel() ** 0.5, (
        f"{name}: differs by {bulk:.3g} (L2, outliers left out) where training moved it {moved:.3g}"
    )


@dataclass(frozen=True)
class AdamWReach:
    """How far AdamW can move one element over a run, whatever its gradients.

    A step is w ← w − lr_t·(m̂/√v̂ + wd·w). By Cauchy-Schwarz over the moving averages,
    |m̂_t/√v̂_t| ≤ c_t = √(Σ_k a_k²/b_k), a_k and b_k the bias-corrected weights of the k-th
    last gradient in m̂ and v̂ (c_1 = 1, ~1 over a few steps, up to ~7 over many)."""

    steps: float  # Σ_t lr_t·c_t: two runs differ by at most twice this (decay only shrinks it)
    decay: float  # Σ_t lr_t·wd

    def __call__(self, w0):
        """Per element of w0; along the way |w_t| ≤ (|w0| + steps) / (1 − decay)."""
        return self.steps + self.decay * (w0.abs() + self.steps) / (1 - self.decay)


def adamw_reach(run) -> AdamWReach:
    """lr_t from the run's metrics.jsonl; betas and weight decay from its checkpoints."""
    import math

    lrs = _train_lrs(run)
    state = next(iter(sorted((run / "checkpoints").glob("step_*/trainer_state.json"))), None)
    assert state is not None, f"{run}: no checkpoint to read the optimizer's settings from"
    groups = json.loads(state.read_text())["param_groups"]
    (b1, b2), wd = groups[0]["betas"], max(g["weight_decay"] for g in groups)
    assert all(g["betas"] == [b1, b2] for g in groups), groups
    steps = 0.0
    for t, lr in enumerate(lrs, start=1):
        a = [(1 - b1) * b1**k / (1 - b1**t) for k in range(t)]
        b = [(1 - b2) * b2**k / (1 - b2**t) for k in range(t)]
        steps += lr * math.sqrt(sum(ak * ak / bk for ak, bk in zip(a, b, strict=True)))
    return AdamWReach(steps=steps, decay=wd * sum(lrs))


def _train_lrs(run) -> list[float]:
    return [e["lr"] for e in read_metrics(run) if e["split"] == "train"]


def final_weights(run) -> dict:
    from safetensors.torch import load_file

    return {
        k: v for f in sorted((run / "final").glob("*.safetensors")) for k, v in load_file(f).items()
    }


def initial_weights(run) -> dict:
    """Where `run` started, named as in its final/: the base model's weights, or the LoRA
    adapter re-created as the trainer creates it (seed, load, `apply_lora`: lora_B 0, lora_A
    seeded); `assert_same_final` finds out if it is not where the run started."""
    import torch
    from safetensors.torch import load_file

    job = json.loads((run / "job.json").read_text())
    if job["training"]["finetuning_type"] != "lora":
        files = sorted(Path(job["model"]).glob("*.safetensors"))
        return {k: v for f in files for k, v in load_file(f).items()}
    from peft import get_peft_model_state_dict
    from transformers import AutoModelForCausalLM
    from tuneplex_automodel.model import apply_lora
    from tuneplex_automodel.trainer import DEFAULT_SEED

    lora, seed = job["training"]["lora"], job["schedule"]["seed"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(DEFAULT_SEED if seed is None else seed)
        model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float32)
        model = apply_lora(
            model,
            rank=lora["rank"],
            alpha=lora["alpha"],
            target_modules=lora["target_modules"],
            use_dora=lora.get("use_dora", False),
        )
    return {k: v.detach() for k, v in get_peft_model_state_dict(model).items()}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on: a rendezvous for ranks, or a server that
    is not there."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


RANKS_TIMEOUT = 240
"""Seconds the ranks of `start_ranks` have, together, to finish."""


def start_ranks(*, script: str | Path, args: list[str], world: int, threads: int = 1) -> None:
    """Run `python SCRIPT ARGS` as ranks 0..world-1 of one local torch.distributed group (torch's
    env:// variables; the script joins with `rank_main`) and wait for all of them. Asserts that
    every rank exits 0, showing the end of the output of each that did not."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": str(threads),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "WORLD_SIZE": str(world),
    }
    with contextlib.ExitStack() as stack:
        # files, not pipes: a rank blocked on a full pipe would hang the others in a collective
        logs = [stack.enter_context(tempfile.TemporaryFile("w+")) for _ in range(world)]
        procs = [
            subprocess.Popen(
                [sys.executable, str(script), *args],
                env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            for r, log in enumerate(logs)
        ]
        deadline, late = time.monotonic() + RANKS_TIMEOUT, set()
        try:
            for p in procs:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=max(0.0, deadline - time.monotonic()))
        finally:
            for r, p in enumerate(procs):
                if p.poll() is None:
                    late.add(r)
                    p.kill()
                    p.wait()
        failed = []
        for r, (p, log) in enumerate(zip(procs, logs, strict=True)):
            if p.returncode != 0:
                log.seek(0)
                why = f"killed after {RANKS_TIMEOUT} s" if r in late else f"exit {p.returncode}"
                failed.append(f"rank {r} ({why}):\n{log.read()[-3000:]}")
    assert not failed, "\n".join(failed)


@contextlib.contextmanager
def gloo_group() -> Iterator[int]:
    """This process's place in a gloo group while the block runs; yields its rank. A rank
    `start_ranks` started joins its group; pytest's own process forms a group of one."""
    import torch.distributed as dist

    if "MASTER_PORT" in os.environ:
        dist.init_process_group("gloo")
    else:
        where = f"tcp://127.0.0.1:{free_port()}"
        dist.init_process_group("gloo", init_method=where, rank=0, world_size=1)
    try:
        yield dist.get_rank()
    finally:
        dist.destroy_process_group()


def rank_main(worker: Callable[[int], object]) -> NoReturn:
    """The `__main__` of a script that `start_ranks` runs: `worker(rank)` in the group, then exit
    at once. The results are on disk and the group is closed; interpreter teardown is skipped,
    where a background thread of torch's now and then aborts the process ("terminate called
    without an active exception", exit -6: seen once in four full runs on 2 CPU cores)."""
    with gloo_group() as rank:
        worker(rank)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


PARALLEL_JOB = """\
model: {model}
dataset: {{training: {root}/train.jsonl, validation: {root}/val.jsonl}}
training: {{finetuning_type: {ft}, max_seq_length: 96, precision: fp32}}
schedule: {{epochs: 1, seed: 3}}
batch: {{global_batch_size: {gbs}, micro_batch_size: 1, sequence_packing: {packed}}}
optimizer: {{learning_rate: 5.0e-3, warmup_steps: 1}}
output: {{checkpoint_steps: 2}}
"""
"""The job the parallel runs are compared on: 14 training rows make 4 steps of 4, the last one
short (2 rows), with validation before, in between and after."""


def parallel_job(root, name: str, *, model, ft: str, gbs: int = 4, packed: bool = False):
    """Write `root/name.yaml` (and, once, the rows it trains on); return its path."""
    if not (root / "train.jsonl").exists():
        write_rows(root / "train.jsonl", chat_rows(14))
        write_rows(root / "val.jsonl", chat_rows(5, seed=1))
    path = root / f"{name}.yaml"
    text = PARALLEL_JOB.format(model=model, root=root, ft=ft, gbs=gbs, packed=str(packed).lower())
    path.write_text(text)
    return path


def reference_runs(root) -> dict:
    """The one-process run of `root`'s lora.yaml and all_weights.yaml: {finetuning type: run}."""
    runs = {}
    for ft in ("lora", "all_weights"):
        runs[ft] = root / f"single-{ft}"
        cli(root / f"{ft}.yaml", "-o", runs[ft])
    return runs


def layout(procs: int, **sizes) -> list[str]:
    """--set arguments for `procs` worker processes and the given parallel sizes."""
    sets = {"num_gpus_per_node": procs, **sizes}
    return [a for k, v in sets.items() for a in ("--set", f"parallelism.{k}={v}")]


def load_final(run, ft: str):
    """final/ of a run loaded the way a user would: the model, or base model + peft adapter."""
    from transformers import AutoModelForCausalLM

    if ft != "lora":
        return AutoModelForCausalLM.from_pretrained(run / "final")
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(json.loads((run / "job.json").read_text())["model"])
    return PeftModel.from_pretrained(base, run / "final")


def cli_together(*jobs: list, env=None) -> list[str]:
    """`tuneplex train ARGS` for each ARGS of `jobs`, all at once in subprocesses (one job's
    imports overlap another's work); waits for them, asserts that each exits 0, and returns
    their outputs (stdout)."""
    with contextlib.ExitStack() as stack:
        # files, not pipes: a job blocked on a full pipe would never finish
        outs = [stack.enter_context(tempfile.TemporaryFile("w+")) for _ in jobs]
        errs = [stack.enter_context(tempfile.TemporaryFile("w+")) for _ in jobs]
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "tuneplex", "train", *map(str, args)],
                stdout=out,
                stderr=err,
                env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
            )
            for args, out, err in zip(jobs, outs, errs, strict=True)
        ]
        deadline = time.monotonic() + 600
        try:
            for p in procs:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=max(0.0, deadline - time.monotonic()))
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        for f in (*outs, *errs):
            f.seek(0)
        failed = [
            f"{' '.join(map(str, args))}: exit {p.returncode}\n{err.read()[-3000:]}"
            for args, p, err in zip(jobs, procs, errs, strict=True)
            if p.returncode != 0
        ]
        assert not failed, "\n".join(failed)
        return [out.read() for out in outs]


def family_config(cls: str, tok, **overrides):
    """The config of a 2-layer model of class `cls` sized for CPU, with what makes the family
    itself: Gemma's tied embeddings, head_dim ≠ hidden / heads, soft-capped logits and sliding
    window (4 tokens: every row is longer), Granite's multipliers, Phi-3's fused projections.
    (Gemma's attention soft-capping is set too, but transformers' SDPA attention, which the
    backend loads, leaves it out.) `overrides` go to the config class with the rest."""
    import transformers as t

    common = dict(
        vocab_size=len(tok),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=256,
        initializer_range=0.1,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    untied = dict(common, tie_word_embeddings=False)
    gemma = dict(
        common,
        head_dim=32,
        query_pre_attn_scalar=32,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention"],
        final_logit_softcapping=30.0,
        attn_logit_softcapping=50.0,
    )
    experts = dict(untied, num_experts_per_tok=2, output_router_logits=False)
    configs = {
        "LlamaForCausalLM": (t.LlamaConfig, untied),
        "MistralForCausalLM": (t.MistralConfig, dict(untied, head_dim=16, sliding_window=4)),
        "Qwen2ForCausalLM": (t.Qwen2Config, untied),
        "Qwen3ForCausalLM": (t.Qwen3Config, dict(untied, head_dim=16)),
        "Gemma2ForCausalLM": (t.Gemma2Config, gemma),
        "Gemma3ForCausalLM": (t.Gemma3TextConfig, gemma),
        "Phi3ForCausalLM": (t.Phi3Config, untied),
        "GraniteForCausalLM": (
            t.GraniteConfig,
            dict(
                untied,
                embedding_multiplier=4.0,
                residual_multiplier=0.5,
                attention_multiplier=0.1,
                logits_scaling=2.0,
            ),
        ),
        "Qwen3MoeForCausalLM": (
            t.Qwen3MoeConfig,
            dict(
                experts,
                head_dim=16,
                moe_intermediate_size=32,
                num_experts=4,
                decoder_sparse_step=1,
                mlp_only_layers=[],
            ),
        ),
        "MixtralForCausalLM": (t.MixtralConfig, dict(experts, num_local_experts=4)),
        "StableLmForCausalLM": (t.StableLmConfig, untied),
    }
    kind, kwargs = configs[cls]
    return kind(**{**kwargs, **overrides})


def build_family(cls: str, tok, **overrides):
    """A model of `family_config`, from a fixed seed."""
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(family_config(cls, tok, **overrides))
    assert type(model).__name__ == cls
    return model


def packed_and_padded_batch(vocab: int) -> dict:
    """A collated batch of two rows: a packed one (two samples, prompts untrained) and a
    padded one with one counted token."""
    import torch
    from tuneplex.data.collate import collate
    from tuneplex.data.targets import IGNORE_INDEX as X

    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, vocab, (30,), generator=g).tolist()
    packed = {
        "input_ids": ids[:17],
        "labels": [X] * 4 + ids[4:9] + [X] * 3 + ids[12:17],
        "position_ids": [*range(9), *range(8)],
    }
    short = {"input_ids": ids[17:23], "labels": [X] * 4 + ids[21:23]}
    return collate([packed, short], pad_id=0)


def trained_runs(tok, ids, labels):
    """Decoded text of each contiguous run of trained tokens."""
    from tuneplex.data.targets import IGNORE_INDEX as _IGNORE

    runs, current = [], []
    for tid, lab in zip(ids, labels, strict=True):
        if lab != _IGNORE:
            assert lab == tid
            current.append(tid)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tok.decode(r, skip_special_tokens=False) for r in runs]


def untrained_text(tok, ids, labels):
    """Decoded text of every untrained token."""
    from tuneplex.data.targets import IGNORE_INDEX as _IGNORE

    return tok.decode(
        [t for t, lab in zip(ids, labels, strict=True) if lab == _IGNORE],
        skip_special_tokens=False,
    )


def preference_rows(n: int, *, seed: int) -> list[dict]:
    """Pairs whose sides differ in their first word only: chosen says yes, rejected no."""
    import random

    from tuneplex.testing.tiny import sentence

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt, answer = sentence(rng), sentence(rng)
        rows.append({"prompt": prompt, "chosen": "yes. " + answer, "rejected": "no. " + answer})
    return rows


def run_job(root: Path, model: str, data, ft: str, extra: str = "") -> Path:
    """A small fp32 job training `model` on (train, validation) `data` for three epochs, with
    a checkpoint at step 3, written to root/FT.yaml; `extra` YAML merged over it."""
    text = f"""\
model: {model}
dataset:
  training: {data[0]}
  validation: {data[1]}
training:
  finetuning_type: {ft}
  max_seq_length: 128
  precision: fp32
schedule:
  epochs: 3
  seed: 7
  val_check_interval: 1.0
batch:
  global_batch_size: 8
  micro_batch_size: 4
optimizer:
  learning_rate: 1.0e-2
  warmup_steps: 1
output:
  checkpoint_steps: 3
"""
    path = root / f"{ft}.yaml"
    path.write_text(merge_yaml(text, extra))
    return path


def chat_job_factory(root: Path, template: str, *, model):
    """job(extra="", name="job.yaml") -> path: `template` (its {model}, {train}, {val} filled
    in; 16 training and 4 validation chat rows written to `root`) with `extra` YAML merged
    over it."""
    train_file, val_file = root / "train.jsonl", root / "val.jsonl"
    write_rows(train_file, chat_rows(16))
    write_rows(val_file, chat_rows(4, seed=1))

    def job(extra: str = "", name: str = "job.yaml") -> Path:
        path = root / name
        text = template.format(model=model, train=train_file, val=val_file)
        path.write_text(merge_yaml(text, extra))
        return path

    return job
