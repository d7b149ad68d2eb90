"""Reinforcement learning from rewards (GRPO): the objective of a grpo job.

An item of the plan is a prompt; a step takes `num_prompts_per_step` of them, each
data-parallel rank its share. Per step, each rank:

1. generates `num_generations_per_prompt` completions of each of its prompts with the model
   being trained (`tuneplex.inference.engine.Generator`: KV cache, batches of
   `generation_batch_size`, the job's temperature / top-p / top-k, stopping at the template's end
   of turn). Every completion draws its tokens with random numbers of its own, a function of
   (seed, step, prompt, generation) and the token's position (`engine.RowSampler`): what a
   completion is depends on neither the number of ranks nor a resumed start, so there is no
   sampling state to carry in a checkpoint. Under FSDP2 the weights are
   gathered once for the whole generation (`gathered`), so ranks generate independently;
2. scores them with the job's reward (`tuneplex.inference.rewards`) and turns the rewards into
   advantages per prompt group (`tuneplex.nn.grpo.advantages`: the group's or the others' mean,
   over the group's std);
3. trains on them: the clipped importance ratio per token with the k3 KL to the reference,
   token- or sequence-level (`tuneplex.nn.grpo.clipped_pg_loss`), the log-probabilities through
   the chunked head (no full-vocabulary logits), `policy_updates_per_step` optimizer updates on
   the same rollouts.

The reference of the KL penalty is the starting model: with LoRA the base with the adapter off
(no second model); with full weights a frozen copy made before the first step, kept on every
rank (reference log-probabilities cannot be computed once ahead: every step brings new
completions). With `ref_policy_kl_penalty: 0` no reference pass is made at all, and completions
whose advantage is 0 (a group whose rewards are all equal) are left out of the forward and
backward: their gradient is exactly 0.

Validation generates one greedy completion per validation prompt; its loss is the negative mean
reward (so `--checkpoint best` is the highest validation reward), reported with `reward`.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneplex.data.collate import EMPTY_ROW, collate
from tuneplex.data.targets import IGNORE_INDEX

from tuneplex_automodel.heap import release_freed
from tuneplex_automodel.loop import gradient_scale

if TYPE_CHECKING:
    from tuneplex.data.pipeline import Prepared

    from tuneplex_automodel.loop import Components
    from tuneplex_automodel.parallel.dims import ParallelDims
    from tuneplex_automodel.parallel.mesh import Dist
    from tuneplex_automodel.schema import AutomodelJobInput
    from tuneplex_automodel.trainer import Runtime

ENVIRONMENT_KEY = "training.grpo.environment"
ROLLOUT_SEED_KEY = "rollout_seed"
"""In a checkpoint's trainer state: the seed every completion's sampler is derived from."""
ROLLOUT_PROMPTS = 2
"""Prompts (all their completions) written to rollouts.jsonl when it is written."""


class PromptTable:
    """The prepared prompts as the plan's items (`pipeline.PROMPT_COLUMNS`), read into Python
    once (a step takes a few of them, every step)."""

    def __init__(self, dataset):
        import numpy as np

        columns = dataset.to_dict()
        self.rows = [
            {"input_ids": list(ids), "prompt": prompt, "reference": reference, "columns": extra}
            for ids, prompt, reference, extra in zip(
                columns["input_ids"],
                columns["prompt"],
                columns["reference"],
                map(json.loads, columns["columns"]),
                strict=True,
            )
        ]
        self.lengths = np.array([len(r["input_ids"]) for r in self.rows], dtype=np.int64)
        self.target_counts = np.zeros(len(self.rows), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def take(self, indices) -> list[dict[str, Any]]:
        return [self.rows[int(i)] for i in indices]


@dataclass
class Rollouts:
    """One step's completions on this rank, ready to train on."""

    rows: list[dict[str, Any]]
    """Per completion: input_ids (prompt + completion + its end), labels (the completion's
    tokens counted), and the figures below by index."""
    advantages: list[float]
    trained: list[int]
    """Indices of the completions that take part in the loss's forward and backward."""
    old: list[Any] | None
    """Per trained completion: its tokens' log-probabilities before the first update (μ > 1)."""
    reference: list[Any] | None
    """Per trained completion: its tokens' log-probabilities under the reference (β > 0)."""
    generated: list[Any] | None
    """Per trained completion: the sampler's log-probabilities (importance-sampling weights)."""
    tokens: float
    """The step's counted completion tokens, every rank's (the token-level mean's divisor)."""
    samples: float
    """The step's counted completions, every rank's (the sequence-level mean's divisor)."""
    stats: Any
    """This rank's sums for the step's figures (`FIGURES` order, before the loss parts)."""
    chunks: int
    """Micro-batches every rank runs (the most any rank needs: FSDP2 gathers in each)."""


FIGURES = (
    "samples",
    "reward_sum",
    "reward_sq_sum",
    "completion_tokens",
    "truncated",
    "advantage_sq_sum",
    "zero_advantage",
    "kl",
    "clip_fraction",
    "tokens",
)
"""The step's summed figures (over micro-batches and ranks): then one sum per reward part."""


class Grpo:
    """The objective of a grpo job."""

    unit = "prompts"
    separate_head = False
    generates = True  # the recipe keeps the layers eager (no torch.compile)
    models: tuple[tuple[str, str], ...] = ()  # the reference is the starting model

    def __init__(self, job: AutomodelJobInput):
        from tuneplex.nn.grpo import ClipSettings

        self.job = job
        self.config = c = job.training.grpo
        self.updates_per_step = c.policy_updates_per_step
        self.settings = ClipSettings(
            ratio_clip_min=c.ratio_clip_min,
            ratio_clip_max=c.ratio_clip_max,
            ratio_clip_c=c.ratio_clip_c,
            ref_policy_kl_penalty=c.ref_policy_kl_penalty,
            use_on_policy_kl_approximation=c.use_on_policy_kl_approximation,
            use_importance_sampling_correction=c.use_importance_sampling_correction,
            token_level_loss=c.token_level_loss,
        )
        self.seed = job.schedule.seed if job.schedule.seed is not None else 42
        self.reward = None
        self.names: tuple[str, ...] = ()
        self.generator = None
        self.tokenizer = self.stop = None
        self.reference_model = None
        self.modules: list[Any] = []
        self.units: list[Any] = []
        self.batch: Rollouts | None = None
        self.times: dict[str, float] = {}

    # -- the plan's items ---------------------------------------------------------------------
    def tables(self, prepared: Prepared) -> tuple[PromptTable, PromptTable | None]:
        """The prompts; the reward is built here, before any model loads (a python reward's
        file runs once in each training process)."""
        from tuneplex.inference.rewards import build_reward, reward_names

        self.reward = build_reward(
            self.config.environment, base_dir=Path.cwd(), key=ENVIRONMENT_KEY
        )
        self.names = reward_names(self.reward)
        validation = prepared.validation
        return (
            PromptTable(prepared.train.examples),
            PromptTable(validation.examples) if validation is not None else None,
        )

    def plan_sizes(self, dims: ParallelDims) -> tuple[int, int]:
        """(prompts per step, prompts per rank): each rank generates for its share at once."""
        prompts = self.config.num_prompts_per_step
        return prompts, max(prompts // dims.dp, 1)

    def batch_text(self, dims: ParallelDims) -> str:
        c = self.config
        per_rank = c.samples_per_step // dims.dp
        micro = self.job.batch.micro_batch_size
        return (
            f"{c.num_prompts_per_step} prompts × {c.num_generations_per_prompt} completions = "
            f"{c.samples_per_step} samples per step"
            + (f" ({per_rank} on each of {dims.dp} data-parallel ranks)" if dims.dp > 1 else "")
            + f", micro-batches of {micro}"
            + (
                f", {self.updates_per_step} updates per batch of rollouts"
                if self.updates_per_step > 1
                else ""
            )
        )

    # -- setup ------------------------------------------------------------------------------
    def setup_model(self, model: Any, *, tokenizer: Any, runtime: Runtime, dist: Dist) -> None:
        """The frozen reference for full weights with a KL penalty (LoRA's is the base with the
        adapter off); the generator's stop tokens from the job's template."""
        import copy

        from tuneplex.data.templates import Encoder
        from tuneplex.inference.prompts import stop_of

        if self.config.ref_policy_kl_penalty > 0 and self.job.training.lora is None:
            self.reference_model = copy.deepcopy(model).eval().requires_grad_(False)
        encoder = Encoder(tokenizer, self.job.data_spec())
        encoder.calibrate([])
        self.tokenizer, self.stop = tokenizer, stop_of(encoder, tokenizer)

    def begin(self, parts: Components) -> None:
        from tuneplex.inference.engine import Generator

        from tuneplex_automodel.parallel.fsdp import fsdp_units

        # found once: walking a LoRA model's modules costs milliseconds, every step
        self.modules = list(parts.model.modules())
        self.units = fsdp_units(parts.model)
        self.generator = Generator(
            parts.model,
            self.tokenizer,
            stop=self.stop,
            device=parts.runtime.device,
            autocast=parts.runtime.autocast,
        )

    # -- a step ------------------------------------------------------------------------------
    def gradients(
        self,
        parts: Components,
        *,
        micro_batches: list[list[int]],
        step_rows: list[int],
        update: int = 0,
        step: int = 0,
    ) -> tuple[Any, Any]:
        import torch

        if update == 0:
            prompts = [i for batch in micro_batches for i in batch]
            self.batch = self.rollout(parts, prompts, step=step)
        t0 = time.perf_counter()
        total, figures = self.train(parts, self.batch)
        stats = torch.as_tensor(self.batch.stats, dtype=torch.float32, device=total.device)
        figures = torch.cat([stats[:7], figures, stats[7:]])
        self.times["training_s"] = self.times.get("training_s", 0.0) * (update > 0) + (
            time.perf_counter() - t0
        )
        return total, figures

    def rollout(self, parts: Components, prompts: list[int], *, step: int):
        """Generate, score and weigh this rank's completions of `prompts`; the reference's and
        the old policy's log-probabilities where the loss needs them."""
        import torch
        from tuneplex.inference.engine import Sampling
        from tuneplex.nn.grpo import advantages

        c, p = self.config, parts
        g = c.num_generations_per_prompt
        rows = p.train_rows.take(prompts)
        seeds = [_seed(self.seed, step, int(i), k) for i in prompts for k in range(g)]
        t0 = time.perf_counter()
        need_generated = c.use_importance_sampling_correction or c.use_on_policy_kl_approximation
        with self._generating(p.model):
            completions = self.generator.generate(
                [row["input_ids"] for row in rows for _ in range(g)],
                Sampling(
                    max_new_tokens=c.max_completion_length,
                    temperature=c.generation_temperature,
                    top_p=c.generation_top_p,
                    top_k=c.generation_top_k or 0,
                ),
                batch_size=c.generation_batch_size,
                row_seeds=seeds,
                log_probs=need_generated,
            )
        t1 = time.perf_counter()
        each = [row for row in rows for _ in range(g)]
        scored = _agreed(p.dist, lambda: _score(self.reward, each, completions))
        t2 = time.perf_counter()
        self.times = {"generation_s": t1 - t0, "scoring_s": t2 - t1}
        rewards = torch.tensor(scored.total, dtype=torch.float64).reshape(len(rows), g)
        adv = advantages(rewards, use_rloo=c.use_rloo, normalize_rewards=c.normalize_rewards)
        adv = adv.reshape(-1).tolist()
        samples = []
        for row, done in zip(each, completions, strict=True):
            completion = [*done.ids, *done.end]
            prompt = row["input_ids"]
            samples.append(
                {
                    "input_ids": [*prompt, *completion],
                    "labels": [IGNORE_INDEX] * len(prompt) + completion,
                }
            )
        truncated = [not done.stopped for done in completions]
        counted = [
            len(s["input_ids"]) > len(r["input_ids"]) and not (c.overlong_filtering and cut)
            for s, r, cut in zip(samples, each, truncated, strict=True)
        ]
        trained = [
            i
            for i, ok in enumerate(counted)
            if ok and (c.ref_policy_kl_penalty > 0 or adv[i] != 0.0)
        ]
        lengths = [len(done.ids) + len(done.end) for done in completions]
        local = torch.tensor(
            [
                sum(n for n, ok in zip(lengths, counted, strict=True) if ok),
                sum(counted),
            ],
            dtype=torch.float64,
            device=p.runtime.device,
        )
        tokens, n_counted = p.dist.sum_over_data(local).tolist()
        micro = self.job.batch.micro_batch_size
        chunks = p.dist.max_over_ranks(max(math.ceil(len(trained) / micro), 1))
        parts_sums = [math.fsum(values) for values in scored.parts.values()]
        stats = [
            float(len(completions)),
            math.fsum(scored.total),
            math.fsum(r * r for r in scored.total),
            float(sum(lengths)),
            float(sum(truncated)),
            math.fsum(a * a for a in adv),
            float(sum(a == 0.0 for a in adv)),
            float(sum(len(s["input_ids"]) for s in samples)),
            *(parts_sums if len(self.names) > 1 else []),
        ]
        batch = Rollouts(
            rows=samples,
            advantages=adv,
            trained=trained,
            old=None,
            reference=None,
            generated=[torch.tensor(completions[i].log_probs, dtype=torch.float32) for i in trained]
            if need_generated
            else None,
            tokens=tokens,
            samples=n_counted,
            stats=stats,
            chunks=int(chunks),
        )
        with torch.no_grad():
            if c.ref_policy_kl_penalty > 0:
                batch.reference = self._log_probs(parts, batch, reference=True)
            if self.updates_per_step > 1:
                batch.old = self._log_probs(parts, batch, reference=False)
        if p.dist.is_main and (step == 0 or (step + 1) % c.rollout_log_steps == 0):
            self._log_rollouts(parts, step + 1, rows, completions, scored, adv, truncated)
        release_freed(p.runtime.device)  # generation's KV caches, before training's passes
        self.times["reference_s"] = time.perf_counter() - t2
        return batch

    def _micro_batches(self, batch: Rollouts) -> list[list[int]]:
        """This rank's trained completions in `batch.chunks` micro-batches (some empty where
        another rank has more)."""
        micro = self.job.batch.micro_batch_size
        return [batch.trained[k * micro : (k + 1) * micro] for k in range(batch.chunks)]

    def _forward(self, model, batch: Rollouts, indices: list[int], runtime, *, pad_id: int):
        """(per-token log-probabilities [rows, positions], counted mask) of `indices`' rows."""
        from tuneplex.nn.evaluation import token_log_probs

        rows = [batch.rows[i] for i in indices] or [EMPTY_ROW]
        tensors = collate(rows, pad_id=pad_id)
        on = {k: v.to(runtime.device) for k, v in tensors.items()}
        logps = token_log_probs(
            model,
            on,
            autocast=runtime.autocast,
            temperature=self.config.generation_temperature,
            chunk=self.config.logprob_chunk_size,
        )
        return logps, on["targets"] != IGNORE_INDEX

    def _log_probs(self, parts: Components, batch: Rollouts, *, reference: bool) -> list[Any]:
        """Per trained completion, its tokens' log-probabilities under the reference (the base
        with the adapter off, or the frozen copy) or the policy as it is now."""
        model = parts.model
        if reference and self.reference_model is not None:
            model = self.reference_model
        off = (
            model.disable_adapter()
            if reference and self.reference_model is None
            else contextlib.nullcontext()
        )
        out: list[Any] = []
        with off:
            for indices in self._micro_batches(batch):
                logps, mask = self._forward(
                    model, batch, indices, parts.runtime, pad_id=parts.pad_id
                )
                for k in range(len(indices)):
                    out.append(logps[k][mask[k]].detach().float())
        return out

    def train(self, parts: Components, batch: Rollouts):
        """Forward and backward of this rank's trained completions; (its share of the loss,
        its share of [kl, clip_fraction, ..., reward parts... ] figures)."""
        import torch
        from tuneplex.nn.grpo import clipped_pg_loss

        p = parts
        scale = gradient_scale(p.dist)
        device = p.runtime.device
        total = torch.zeros((), dtype=torch.float32, device=device)
        figures = torch.zeros(2, dtype=torch.float32, device=device)
        at = 0
        for indices in self._micro_batches(batch):  # FSDP2 reduce-scatters each pass
            logps, mask = self._forward(p.model, batch, indices, p.runtime, pad_id=p.pad_id)
            if not indices:  # keeps every rank's collectives (and the graph) in step
                (0.0 * logps.sum()).backward()
                continue
            mine = slice(at, at + len(indices))
            old = _placed(batch.old, mine, logps, mask) if batch.old else logps.detach()
            ref = _placed(batch.reference, mine, logps, mask)
            gen = _placed(batch.generated, mine, logps, mask)
            adv = torch.tensor(
                [batch.advantages[i] for i in indices], dtype=torch.float32, device=device
            )
            loss, parts_ = clipped_pg_loss(
                logprobs=logps,
                old_logprobs=old,
                advantages=adv,
                mask=mask,
                settings=self.settings,
                ref_logprobs=ref,
                generation_logprobs=gen,
                tokens=batch.tokens,
                samples=batch.samples,
            )
            (loss * scale if scale > 1 else loss).backward()
            release_freed(device)  # this pass's activations, before the next one's
            total += loss.detach()
            figures += torch.stack([parts_["kl"].float(), parts_["clip_fraction"].float()])
            at += len(indices)
        return total, figures

    def figures(self, sums: list[float]) -> dict[str, float]:
        n = max(sums[0], 1.0)
        mean = sums[1] / n
        out = {
            "reward": mean,
            "reward_std": math.sqrt(max(sums[2] / n - mean * mean, 0.0)),
        }
        tail = sums[len(FIGURES) :]
        for name, value in zip(self.names if len(self.names) > 1 else (), tail, strict=False):
            out[f"reward/{name}"] = value / n
        out |= {
            "kl": sums[7],
            "clip_fraction": sums[8],
            "completion_length": sums[3] / n,
            "truncated_fraction": sums[4] / n,
            "advantage_std": math.sqrt(sums[5] / n),
            "zero_advantage_fraction": sums[6] / n,
            "tokens": int(sums[9]),
        }
        out |= {k: round(v, 4) for k, v in self.times.items()}
        return out

    # -- validation and state ---------------------------------------------------------------
    def validate(self, parts: Components) -> tuple[float, dict[str, float]]:
        """One greedy completion per validation prompt (each rank its share); the mean reward,
        and its negative as the loss."""
        import torch
        from tuneplex.inference.engine import Sampling

        p, table = parts, parts.val_rows
        mine = list(range(p.dist.dp_rank, len(table), p.dist.dp_size))
        rows = table.take(mine)
        with self._generating(p.model):
            completions = self.generator.generate(
                [row["input_ids"] for row in rows],
                Sampling(max_new_tokens=self.config.max_completion_length),
                batch_size=self.config.generation_batch_size,
            )
        sums = torch.zeros(1 + len(self.names), dtype=torch.float64, device=p.runtime.device)
        if rows:
            scored = _score(self.reward, rows, completions)
            values = [math.fsum(scored.total), *(math.fsum(v) for v in scored.parts.values())]
            sums += torch.tensor(values, dtype=torch.float64, device=sums.device)
        sums = p.dist.sum_over_data(sums).tolist()
        n = max(len(table), 1)
        reward = sums[0] / n
        out = {"reward": reward}
        if len(self.names) > 1:
            out |= {f"reward/{name}": v / n for name, v in zip(self.names, sums[1:], strict=True)}
        return 0.0 - reward, out  # 0.0 - 0.0 is 0.0, where -0.0 would print as "-0.0000"

    @contextlib.contextmanager
    def _generating(self, model):
        """The model in eval mode (each module's flag set directly: `eval()` walks the module
        tree, twice a step) with its FSDP2 weights gathered once for the whole generation
        (each rank then generates on its own, however long its completions run); put back
        after."""
        from tuneplex_automodel.parallel.fsdp import gathered

        modes = [m.training for m in self.modules]
        # the flag written into each module's __dict__: Module.__setattr__'s checks of
        # parameters, buffers and submodules cost milliseconds over a LoRA model's modules
        for m in self.modules:
            m.__dict__["training"] = False
        try:
            with gathered(model, self.units):
                yield
        finally:
            for m, mode in zip(self.modules, modes, strict=True):
                m.__dict__["training"] = mode

    def state(self) -> dict[str, Any]:
        return {ROLLOUT_SEED_KEY: self.seed}

    def restore(self, state: dict[str, Any]) -> None:
        """Nothing to take back: a completion's sampler is seeded from (seed, step, prompt,
        generation), and the seed is the job's."""

    def _log_rollouts(self, parts, step, rows, completions, scored, adv, truncated) -> None:
        g = self.config.num_generations_per_prompt
        records = []
        for k in range(min(ROLLOUT_PROMPTS, len(rows)) * g):
            record = {
                "prompt": rows[k // g]["prompt"],
                "completion": completions[k].text,
                "reward": scored.total[k],
                "advantage": round(adv[k], 6),
                "truncated": truncated[k],
            }
            if len(self.names) > 1:
                record["rewards"] = {name: values[k] for name, values in scored.parts.items()}
            records.append(record)
        parts.recorder.rollouts(step=step, records=records)


def _score(reward, rows: list[dict[str, Any]], completions):
    """`reward` on each row's completion, with the rows' other columns and references."""
    from tuneplex.inference.rewards import row_columns, score

    return score(
        reward=reward,
        prompts=[row["prompt"] for row in rows],
        completions=[done.text for done in completions],
        columns=row_columns([row["columns"] for row in rows]),
        references=[row["reference"] for row in rows],
    )


def _agreed(dist, work):
    """`work()`, whose failure (`TrainingStopped`: the job's reward) on any rank stops every
    rank, each with the failing rank's message (no rank is left waiting in a collective)."""
    from tuneplex.errors import TrainingStopped

    failure = None
    try:
        result = work()
    except TrainingStopped as exc:
        failure = exc
    if dist.world_size > 1 and dist.max_over_ranks(int(failure is not None)):
        import torch.distributed

        said: list[str | None] = [None] * dist.world_size
        torch.distributed.all_gather_object(said, str(failure) if failure else None)
        if failure is None:
            raise TrainingStopped(next(s for s in said if s))
    if failure is not None:
        raise failure
    return result


def _placed(values: list[Any] | None, mine: slice, like, mask):
    """Per-completion vectors `values[mine]` placed at the counted positions of `like`."""
    if values is None:
        return None
    import torch

    full = torch.zeros_like(like)
    full[mask] = torch.cat([v.to(like.device) for v in values[mine]])
    return full


def _seed(seed: int, step: int, prompt: int, generation: int) -> int:
    """A completion's sampler seed: a hash of where it is, the same on any rank."""
    import hashlib

    digest = hashlib.blake2b(f"{seed}/{step}/{prompt}/{generation}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "little") >> 1
