"""Preference tuning on the unsloth backend: TRL's trainers fed with the core pipeline's pairs.
DPO, IPO, hinge and robust DPO run TRL's DPOTrainer; orpo its ORPOTrainer and simpo its
CPOTrainer (loss_type simpo, cpo_alpha = sft_loss_weight), both from trl.experimental and with
no reference model; kto_pair, which no TRL trainer computes, is refused by the schema.

The pipeline gives each pair as two rows, chosen then rejected, rendered, masked and truncated
as SFT rows are. `pair_dataset` reads them as one item per pair without copying them;
`PairCollator` builds DPOTrainer's batch (every chosen side, then every rejected side) with
TRL's completion mask taken from the pipeline's labels, and `SideCollator` the chosen_* /
rejected_* batch ORPO and CPO read, its labels the pipeline's: TRL scores exactly the tokens
the core decided. TRL computes the losses and the rewards (`schema.trl_loss_type` says which of
the job's objectives TRL has); ORPO's NLL term is the core's, the chosen response's mean over
its tokens (TRL's own counts the prompt as well). DPO's reference is the starting model: with
LoRA the base model (the adapter disabled), with full weights TRL's frozen copy.
"""

from __future__ import annotations

from typing import Any

from tuneplex.data.collate import collate_for_hf
from tuneplex.data.targets import IGNORE_INDEX
from tuneplex.nn.preference import REWARD_KEYS

from tuneplex_unsloth.schema import UnslothJobInput, trl_loss_type

TRL_REWARD_KEYS = dict(
    zip(
        REWARD_KEYS,
        ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"),
        strict=True,
    )
)
"""tuneplex's metric name -> TRL's, for the reward figures every backend reports."""

PAIR_COLUMNS = ("pair_input_ids", "pair_labels")
"""The columns of `pair_dataset`: per pair, [chosen side, rejected side]."""

REFERENCE_FREE_TRAINERS = {"orpo": "ORPO", "simpo": "CPO"}
"""loss_type -> the trl.experimental trainer that computes it (the others: DPOTrainer)."""


def log_keys(job: UnslothJobInput) -> dict[str, str]:
    """tuneplex's metric name -> TRL's, for the figures of the job's trainer: the rewards, and
    `sft_loss` where there is an NLL term (orpo's own, CPO's cpo_alpha)."""
    d = job.training.dpo
    if d.loss_type == "orpo" or (d.loss_type == "simpo" and d.sft_loss_weight > 0):
        return {**TRL_REWARD_KEYS, "sft_loss": "nll_loss"}
    return dict(TRL_REWARD_KEYS)


def dpo_config(job: UnslothJobInput, *, common: dict[str, Any]):
    """The config of the job's TRL trainer (DPOConfig, ORPOConfig or CPOConfig): `common` (the
    SFT path's mapping) plus the preference settings."""
    from tuneplex_unsloth.model import torch_dtype

    d = job.training.dpo
    if d.loss_type in REFERENCE_FREE_TRAINERS:
        return reference_free_config(job, common=common)
    from trl import DPOConfig

    loss_type, weights = [trl_loss_type(d)], [d.preference_loss_weight]
    if d.sft_loss_weight > 0:
        loss_type.append("sft")  # TRL: the mean NLL over the batch's chosen tokens
        weights.append(d.sft_loss_weight)
    full = job.training.finetuning_type == "all_weights"
    return DPOConfig(
        **common,
        beta=d.ref_policy_kl_penalty,
        loss_type=loss_type,
        loss_weights=weights,
        label_smoothing=d.label_smoothing,
        max_length=job.model.max_seq_length,  # the pipeline has truncated every side already
        precompute_ref_log_probs=False,
        disable_dropout=False,  # training.lora.dropout applies as it does for sft
        trust_remote_code=job.model.trust_remote_code,
        # all_weights: TRL loads the frozen reference from the same place, in the same dtype
        model_init_kwargs={"dtype": str(torch_dtype(job)).removeprefix("torch.")} if full else None,
    )


def reference_free_config(job: UnslothJobInput, *, common: dict[str, Any]):
    """ORPOConfig (β: the odds-ratio weight λ) or CPOConfig (SimPO: β the reward scale, γ the
    target margin, cpo_alpha the SFT weight); no reference model, so no copy to load."""
    d = job.training.dpo
    shared = dict(
        **common,
        beta=d.ref_policy_kl_penalty,
        max_length=job.model.max_seq_length,  # the pipeline has truncated every side already
        disable_dropout=False,  # training.lora.dropout applies as it does for sft
        trust_remote_code=job.model.trust_remote_code,
    )
    if d.loss_type == "orpo":
        return experimental("orpo", "ORPOConfig")(**shared)
    return experimental("cpo", "CPOConfig")(
        **shared,
        loss_type="simpo",
        simpo_gamma=d.simpo_gamma,
        cpo_alpha=d.sft_loss_weight,
        label_smoothing=0.0,
    )


def experimental(module: str, name: str):
    """`name` from trl.experimental.`module`, without TRL's warning that the API is unstable
    (tuneplex's tests pin what it relies on)."""
    import importlib
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*trl.experimental")
        return getattr(importlib.import_module(f"trl.experimental.{module}"), name)


def pair_dataset(sides):
    """The interleaved side rows (2i chosen, 2i+1 rejected) as one item per pair: each column
    a list of the pair's two sides. Arrow views over the same buffers: nothing is copied."""
    import pyarrow as pa
    from datasets import Dataset

    if getattr(sides, "_indices", None) is not None:  # a selected view: materialise it once
        sides = sides.flatten_indices()
    table = sides.data.table
    columns = {}
    for name, column in zip(PAIR_COLUMNS, ("input_ids", "labels"), strict=True):
        values = table.column(column)
        chunks = values.chunks
        if any(len(c) % 2 for c in chunks):  # a pair split across chunks
            chunks = [values.combine_chunks()]
        columns[name] = pa.chunked_array(
            [pa.FixedSizeListArray.from_arrays(c, 2) for c in chunks],
            type=pa.list_(values.type, 2),
        )
    return Dataset(pa.table(columns))


class PairCollator:
    """TRL's preference batch from `pair_dataset` items: input_ids, attention_mask and
    completion_mask, chosen sides first. The completion mask marks the labels the core's target
    rule counts (`collate_for_hf`), so TRL's own shift scores exactly the core's targets."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    @staticmethod
    def sides(pairs) -> list[dict[str, Any]]:
        return [
            {"input_ids": p[PAIR_COLUMNS[0]][side], "labels": p[PAIR_COLUMNS[1]][side]}
            for side in (0, 1)
            for p in pairs
        ]

    @staticmethod
    def tokens(pairs) -> int:
        return sum(len(ids) for p in pairs for ids in p[PAIR_COLUMNS[0]])

    def __call__(self, pairs) -> dict[str, Any]:
        import torch

        rows = self.sides(pairs)
        batch = collate_for_hf(rows, pad_id=self.pad_id)
        lengths = torch.tensor([len(r["input_ids"]) for r in rows])
        width = batch["input_ids"].shape[1]
        return {
            "input_ids": batch["input_ids"],
            "attention_mask": (torch.arange(width) < lengths[:, None]).long(),
            "completion_mask": (batch["labels"] != IGNORE_INDEX).long(),
        }


class SideCollator(PairCollator):
    """ORPO's and CPO's batch from `pair_dataset` items: chosen_* and rejected_* input_ids,
    attention_mask and labels (the pipeline's, unshifted: TRL's own shift scores exactly the
    core's targets); each side padded on its own, TRL pads both to one width."""

    def __call__(self, pairs) -> dict[str, Any]:
        import torch

        rows = self.sides(pairs)
        out = {}
        for side, part in (("chosen", rows[: len(pairs)]), ("rejected", rows[len(pairs) :])):
            batch = collate_for_hf(part, pad_id=self.pad_id)
            lengths = torch.tensor([len(r["input_ids"]) for r in part])
            width = batch["input_ids"].shape[1]
            out[f"{side}_input_ids"] = batch["input_ids"]
            out[f"{side}_attention_mask"] = (torch.arange(width) < lengths[:, None]).long()
            out[f"{side}_labels"] = batch["labels"]
        return out


def collator_for(job: UnslothJobInput, pad_id: int) -> PairCollator:
    if job.training.dpo.loss_type in REFERENCE_FREE_TRAINERS:
        return SideCollator(pad_id)
    return PairCollator(pad_id)


def preference_trainer_class(job: UnslothJobInput):
    """The TRL trainer class of the job's loss_type, over tuneplex's prepared pairs."""
    kind = REFERENCE_FREE_TRAINERS.get(job.training.dpo.loss_type)
    if kind is None:
        return dpo_trainer_class()
    return reference_free_trainer_class(kind, keys=log_keys(job))


def reference_free_trainer_class(kind: str, *, keys: dict[str, str]):
    """TRL's ORPOTrainer or CPOTrainer over tuneplex's prepared pairs (their own tokenization
    skipped); ORPO's NLL term on the chosen response's tokens, averaged per pair as the core
    defines it. `keys`: the figures validation reports (ours: TRL's)."""
    base = experimental(kind.lower(), f"{kind}Trainer")

    class TuneplexReferenceFreeTrainer(base):
        def tokenize_row(self, feature, model=None):
            return {}  # tokenized, masked and truncated by tuneplex's pipeline

        def concatenated_forward(self, model, batch):
            out = super().concatenated_forward(model, batch)
            if kind != "ORPO":
                return out
            # TRL's NLL term averages over the prompt's tokens too; ORPO's is the chosen
            # response's, per pair (tuneplex.nn.preference): from TRL's own averages
            return (*out[:4], -out[0].mean(), *out[5:])

        def validate_pairs(self, pairs, *, collate: PairCollator, micro: int):
            """(loss, tokens, reward figures) over every pair of `pairs`: TRL's loss and
            figures in eval mode, each batch weighted by its pairs; the model's mode is kept."""
            import torch

            model = self.model
            was_training = model.training
            sums = dict.fromkeys(("loss", *keys), 0.0)
            tokens = 0
            model.eval()
            try:
                for start in range(0, len(pairs), micro):
                    items = [pairs[i] for i in range(start, min(start + micro, len(pairs)))]
                    batch = self._prepare_inputs(collate(items))
                    with torch.no_grad(), self.accelerator.autocast():
                        loss, found = self.get_batch_loss_metrics(model, batch, "eval")
                    n, tokens = len(items), tokens + collate.tokens(items)
                    sums["loss"] += n * loss.item()
                    for ours, theirs in keys.items():
                        sums[ours] += n * float(found[f"eval_{theirs}"])
            finally:
                model.train(was_training)
            n = max(len(pairs), 1)
            figures = {ours: sums[ours] / n for ours in keys}
            return sums["loss"] / n, tokens, figures

    TuneplexReferenceFreeTrainer.__name__ = f"Tuneplex{kind}Trainer"
    return TuneplexReferenceFreeTrainer


def dpo_trainer_class():
    """TRL's DPOTrainer over tuneplex's prepared pairs, its reference the base model for LoRA;
    off CUDA its Triton-only fused LM head is computed from the model's own logits."""
    from trl import DPOTrainer

    class TuneplexDPOTrainer(DPOTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            model = self.model
            base_model_as_reference(model)
            if self.args.device.type != "cuda":
                base = model.get_base_model() if hasattr(model, "get_base_model") else model
                for m in (base, self.ref_model):
                    if m is not None:
                        plain_lm_head(m)

        def _prepare_dataset(self, dataset, *_args, **_kwargs):
            return dataset  # tokenized, masked and truncated by tuneplex's pipeline

        def validate_pairs(self, pairs, *, collate: PairCollator, micro: int):
            """(loss, tokens, reward figures) over every pair of `pairs`: TRL's loss and
            rewards in eval mode, each batch weighted by its pairs; the model's mode is kept."""
            import torch

            model, found = self.model, self._metrics["eval"]
            was_training = model.training
            sums = dict.fromkeys(("loss", *TRL_REWARD_KEYS.values()), 0.0)
            tokens = 0
            model.eval()
            found.clear()
            try:
                for start in range(0, len(pairs), micro):
                    items = [pairs[i] for i in range(start, min(start + micro, len(pairs)))]
                    batch = self._prepare_inputs(collate(items))
                    with torch.no_grad(), self.accelerator.autocast():
                        loss = self.compute_loss(model, batch)
                    n, tokens = len(items), tokens + collate.tokens(items)
                    sums["loss"] += n * loss.item()
                    for key in TRL_REWARD_KEYS.values():
                        sums[key] += n * found[key][-1]
            finally:
                found.clear()
                model.train(was_training)
            n = max(len(pairs), 1)
            figures = {ours: sums[theirs] / n for ours, theirs in TRL_REWARD_KEYS.items()}
            return sums["loss"] / n, tokens, figures

    return TuneplexDPOTrainer


def base_model_as_reference(model) -> None:
    """TRL copies a new LoRA adapter as a "ref" adapter (DPO, and GRPO with a KL penalty); a
    fresh adapter is zero, so the reference is the base model, which TRL uses (the adapter
    disabled) when "ref" is absent: the copy is dropped, its memory with it."""
    if hasattr(model, "peft_config") and "ref" in model.peft_config:
        model.delete_adapter("ref")


def plain_lm_head(model) -> None:
    """TRL's fused LM head (`model(..., labels=..., fused_lm_head=True)`, a Triton kernel) in
    plain torch from the model's own logits: the same per-token outputs, zero where a label is
    not counted. For the CPU seam, whose models are tiny."""
    import types

    fused = model.forward  # TRL's wrapper: without fused_lm_head, the model's own forward

    def forward(self, *args, fused_lm_head=False, labels=None, **kwargs):
        if not fused_lm_head:
            return fused(*args, labels=labels, **kwargs)
        return head_outputs(fused(*args, **kwargs), labels)

    model.forward = types.MethodType(forward, model)


def head_outputs(out, labels):
    """`FusedCausalLMOutput` of a forward's logits and the (unshifted) labels."""
    import torch
    from trl.trainer.utils import FusedCausalLMOutput

    logits, targets = out.logits[:, :-1].float(), labels[:, 1:]
    mask = targets != IGNORE_INDEX
    logp = logits.log_softmax(-1)
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    log_probs = torch.where(mask, picked, torch.zeros_like(picked))
    with torch.no_grad():
        entropy = -(logp.exp() * logp).sum(-1)
        log_sum_sq_probs = torch.logsumexp(2 * logp, dim=-1)
        mean_logits = logits.mean(-1)
        is_top1 = (logits.argmax(-1) == targets) & mask
    zero = torch.zeros_like(entropy)
    return FusedCausalLMOutput(
        loss=-log_probs.sum() / mask.sum().clamp(min=1),
        log_probs=log_probs,
        entropy=torch.where(mask, entropy, zero),
        log_sum_sq_probs=torch.where(mask, log_sum_sq_probs, zero),
        mean_logits=torch.where(mask, mean_logits, zero),
        is_top1=is_top1,
        label_mask=mask,
        aux_loss=getattr(out, "aux_loss", None),
    )
