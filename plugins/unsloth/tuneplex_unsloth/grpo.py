"""Reinforcement learning from rewards (GRPO) on the unsloth backend: TRL's GRPOTrainer fed with
the core pipeline's prompts and scored by the core's rewards.

The pipeline renders each prompt as training renders what comes before an answer (chat
template and generation prompt included); TRL generates from exactly those ids (no second BOS,
no second template) and gives its reward functions the user's own text. `Scorer` runs the
job's reward once per batch through `rewards.score` (the same checks and stops as on every
backend) and hands TRL one function per part, so each part is logged apart. TRL computes the
clipped loss with its KL penalty; the advantages are the core's (`tuneplex.nn.grpo`):
leave-one-out or group baseline, normalised by the group's spread, as `use_rloo` and
`normalize_rewards` say — TRL's own RLOOTrainer is another objective (sequence-level ratios, the
KL in the reward), and its `scale_rewards` divides by a Bessel-corrected std plus 1e-4.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from tuneplex.inference.rewards import MultiReward, Scored, reward_names, row_columns, score
from tuneplex.schema.grpo import GrpoConfig

from tuneplex_unsloth.schema import UnslothJobInput, trl_grpo_loss_type

TRL_FIGURES = {
    "reward": "reward",
    "reward_std": "reward_std",
    "kl": "kl",
    "clip_fraction": "clip_ratio/region_mean",
    "completion_length": "completions/mean_length",
    "truncated_fraction": "completions/clipped_ratio",
}
"""tuneplex's metric name -> TRL's, for the figures of every GRPO step (`kl` only with a KL
penalty); each reward part adds `reward/<name>` <- `rewards/<name>/mean` (`figure_keys`)."""

ROLLOUT_PROMPTS = 2
"""Prompts (each with all its completions) written to rollouts.jsonl when a step is due."""


def figure_keys(names: Sequence[str]) -> dict[str, str]:
    """Every figure metrics.jsonl takes from TRL's log lines (ours: theirs)."""
    return {**TRL_FIGURES, **{f"reward/{n}": f"rewards/{n}/mean" for n in names}}


def grpo_config(job: UnslothJobInput, *, common: dict[str, Any], weights: Sequence[float] | None):
    """GRPOConfig from the job: `common` (the SFT path's mapping) plus the GRPO settings. Samples
    per step are per_device_train_batch_size × gradient_accumulation_steps (the schema derives
    the latter), so TRL generates once per optimizer step."""
    from trl import GRPOConfig

    from tuneplex_unsloth.model import torch_dtype

    g = job.training.grpo
    full = job.training.finetuning_type == "all_weights"
    return GRPOConfig(
        **common,
        num_generations=g.num_generations_per_prompt,
        max_completion_length=g.max_completion_length,
        num_iterations=g.policy_updates_per_step,
        beta=g.ref_policy_kl_penalty,
        epsilon=g.ratio_clip_min,
        epsilon_high=g.ratio_clip_max,
        delta=g.ratio_clip_c,  # above 1 + ratio_clip_max (the schema's rule): the dual clip
        loss_type=trl_grpo_loss_type(g),
        scale_rewards="group" if g.normalize_rewards else "none",  # TRL's own figures only
        mask_truncated_completions=g.overlong_filtering,
        use_bias_correction_kl=False,  # TRL's default weights the KL by the ratio
        temperature=g.generation_temperature,
        top_p=g.generation_top_p,
        top_k=g.generation_top_k or 0,
        reward_weights=list(weights) if weights is not None else None,
        disable_dropout=False,  # training.lora.dropout applies as it does for sft
        trust_remote_code=job.model.trust_remote_code,
        # all_weights with a KL penalty: TRL loads the frozen reference like the policy
        model_init_kwargs={"dtype": str(torch_dtype(job)).removeprefix("torch.")} if full else None,
    )


@dataclass
class TokenTally:
    """Tokens (prompt and completion) of the micro-batches trained so far."""

    total: int = 0


class Scorer:
    """The job's reward, scored once per batch of completions with `rewards.score`; TRL sees one
    function per part (`functions`, named as the parts are logged), the first of which scores.
    Every `every` steps the first prompts' completions go to `record` (rollouts.jsonl)."""

    def __init__(self, reward, *, group: int, every: int, record: Callable[..., None] | None):
        self.reward, self.names = reward, reward_names(reward)
        self.group, self.every, self.record = group, every, record
        self.last: Scored | None = None
        self.due: int | None = None

    @property
    def weights(self) -> tuple[float, ...] | None:
        return self.reward.weights if isinstance(self.reward, MultiReward) else None

    def functions(self) -> list[Callable[..., list[float]]]:
        return [self._part(i, name) for i, name in enumerate(self.names)]

    def _part(self, index: int, name: str):
        def part(prompts, completions, **kw) -> list[float]:
            if index == 0 or self.last is None:  # TRL calls the parts in order, batch by batch
                self.last = self.score(list(prompts), list(completions), kw)
            return self.last.parts[name]

        part.__name__ = part.__qualname__ = name
        return part

    def score(self, prompts: list[str], completions: list[str], kw: Mapping[str, Any]) -> Scored:
        references = list(kw["reference"])
        scored = score(
            reward=self.reward,
            prompts=prompts,
            completions=completions,
            columns=row_columns([json.loads(r) for r in kw["columns"]]),
            references=references,
        )
        state = kw.get("trainer_state")
        if self.record is not None and state is not None:
            self._log(state.global_step + 1, prompts, completions, references, scored)
        return scored

    def _log(self, step, prompts, completions, references, scored: Scored) -> None:
        if self.due is None:
            self.due = -(-step // self.every) * self.every  # the first multiple at or after
        if step < self.due:
            return
        self.due = (step // self.every + 1) * self.every
        records = []
        for i in range(min(len(prompts), ROLLOUT_PROMPTS * self.group)):
            record = {
                "prompt": prompts[i],
                "completion": completions[i],
                "reward": scored.total[i],
                "reference": references[i],
            }
            if len(scored.parts) > 1:
                record["rewards"] = {name: values[i] for name, values in scored.parts.items()}
            records.append(record)
        self.record(step=step, records=records)


def grpo_trainer_class():
    """TRL's GRPOTrainer (unsloth's patched one when unsloth is loaded) over tuneplex's prompts
    and rewards, its reference the base model for LoRA."""
    import torch
    from trl import GRPOTrainer

    from tuneplex_unsloth.dpo import base_model_as_reference

    class TuneplexGRPOTrainer(GRPOTrainer):
        def __init__(
            self, *args, scorer: Scorer, advantages, generation_batch: int, tally, **kwargs
        ):
            self.scorer, self.advantage_rule = scorer, advantages
            self.generation_batch, self.tally = generation_batch, tally
            self._prompt_ids: list[list[int]] | None = None
            super().__init__(*args, reward_funcs=scorer.functions(), **kwargs)
            base_model_as_reference(self.model)

        def _generate_and_score_completions(self, inputs):
            self._prompt_ids = [list(x["input_ids"]) for x in inputs]
            out = super()._generate_and_score_completions(inputs)
            total = torch.tensor(self.scorer.last.total, dtype=torch.float64)
            found = out["advantages"]
            if total.numel() != found.numel():
                raise RuntimeError(f"{total.numel()} rewards for {found.numel()} completions")
            rule = self.advantage_rule(total.view(-1, self.num_generations))
            out["advantages"] = rule.reshape(-1).to(device=found.device, dtype=found.dtype)
            return out

        def _tokenize_prompts(self, prompts):
            """The pipeline's ids of this batch's prompts, as rendered for training."""
            ids, self._prompt_ids = self._prompt_ids, None
            if ids is None or len(ids) != len(prompts):
                raise RuntimeError("prompt ids out of step with TRL's prompts")
            return ids, None, {}

        def _generate_single_turn(self, prompt_ids, *args, **kwargs):
            """At most `generation_batch` completions generated together."""
            size = self.generation_batch
            if len(prompt_ids) <= size:
                return super()._generate_single_turn(prompt_ids, *args, **kwargs)
            completion_ids, logprobs = [], []
            for start in range(0, len(prompt_ids), size):
                ids, lps = super()._generate_single_turn(
                    prompt_ids[start : start + size], *args, **kwargs
                )
                completion_ids += ids
                logprobs = None if lps is None or logprobs is None else logprobs + lps
            return completion_ids, logprobs

        def _prepare_inputs(self, generation_batch):
            inputs = super()._prepare_inputs(generation_batch)
            if self.model.training:
                self.tally.total += int(
                    inputs["prompt_mask"].sum() + inputs["completion_mask"].sum()
                )
            return inputs

    return TuneplexGRPOTrainer


def advantage_rule(grpo: GrpoConfig):
    """The core's advantages of a `[prompts, generations]` reward tensor, as the job says."""
    from tuneplex.nn.grpo import advantages

    return partial(advantages, use_rloo=grpo.use_rloo, normalize_rewards=grpo.normalize_rewards)
