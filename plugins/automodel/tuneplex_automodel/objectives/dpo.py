"""Preference tuning (DPO, IPO, hinge, robust DPO, KTO on pairs, ORPO, SimPO, unpaired KTO): the
objective of a dpo job; the losses are `tuneplex.nn.preference`'s.

Unpaired KTO (loss_type kto) reads its rows the same way: the pipeline gives row i as side row
2i and its mismatched prompt/completion pair (`tuneplex.data.unpaired`) as 2i+1, so the
reference pass and the checkpointed values cover both. KTO's reference point z is each
micro-batch's mean (log π − log π_ref) over its rows' mismatched pairs, summed over the
data-parallel ranks (every rank takes part, with no row too), clamped at 0, detached; its
figures are TRL's: rewards/chosen and rewards/rejected (the mean reward of desirable and of
undesirable rows), rewards/margin (their difference) and kl (the mean z).

The data pipeline gives each pair as two rows, chosen then rejected (`PairTable` reads them as
one item each, so the plan, the row order and data parallelism treat a pair as a row). The
reference model is the starting model: before the first step, one pass with no gradients
computes every side's log-probability (each data-parallel rank its share, summed over ranks);
the values travel with every checkpoint, so a resumed run compares with the same reference.
No second model is held, LoRA or full weights. The reference-free losses (orpo, simpo) make no
reference pass and keep no reference values. Log-probabilities come from the chunked head
(`tuneplex.nn.evaluation.sequence_log_probs`): no full-vocabulary logits.

Figures: `rewards/*` (see `tuneplex.nn.preference`: β (log π − log π_ref) with a reference,
β · the average log-prob without one), and `sft_loss`: the SFT part where sft_loss_weight > 0,
for orpo its NLL term (the mean over pairs of each chosen response's per-token NLL).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tuneplex.data.collate import RowTable
from tuneplex.nn.evaluation import inference_passes, sequence_log_probs
from tuneplex.nn.preference import (
    KTO_SUMS,
    REFERENCE_FREE,
    REWARD_KEYS,
    kto_figures,
    kto_loss,
    kto_reference_point,
    kto_sums,
    preference_loss,
    reward_sums,
)

from tuneplex_automodel.loop import backward_micro_batches, device_batch
from tuneplex_automodel.objectives.sft import row_tables

if TYPE_CHECKING:
    from tuneplex.data.pipeline import Prepared

    from tuneplex_automodel.loop import Components
    from tuneplex_automodel.parallel.mesh import Dist
    from tuneplex_automodel.schema import AutomodelJobInput
    from tuneplex_automodel.trainer import Runtime

REFERENCE_KEY = "reference_log_probs"
"""In a checkpoint's trainer state: {"train": [...], "validation": [...]}, one per side row."""

SFT_KEY = "sft_loss"
PARTS = 1 + len(REWARD_KEYS)
"""What a micro-batch adds to the step's figures: the SFT part, then `reward_sums`."""


class PairTable:
    """Pairs over interleaved side rows (2i chosen, 2i+1 rejected), read as one item each:
    `lengths` and `target_counts` of a pair are its two sides' together."""

    def __init__(self, rows: RowTable):
        self.rows = rows
        self.lengths = rows.lengths[0::2] + rows.lengths[1::2]
        self.target_counts = rows.target_counts[0::2] + rows.target_counts[1::2]
        self.chosen_counts = rows.target_counts[0::2]
        desirable = rows.values.get("desirable")
        self.desirable = desirable[0::2] if desirable is not None else None
        """Unpaired KTO data: each row's label (its pair is the row and its mismatched pair)."""

    def __len__(self) -> int:
        return len(self.lengths)

    def side_indices(self, pairs) -> list[int]:
        """The side rows of `pairs`: every chosen side, then every rejected side."""
        return [2 * int(i) for i in pairs] + [2 * int(i) + 1 for i in pairs]

    def take(self, pairs) -> list[dict[str, Any]]:
        return self.rows.take(self.side_indices(pairs))


class Dpo:
    """The objective of a dpo job and the reference log-probabilities it compares with."""

    updates_per_step = 1
    unit = "pairs"
    separate_head = False
    models: tuple[tuple[str, str], ...] = ()  # the reference is the starting model

    def __init__(self, job: AutomodelJobInput):
        self.config = job.training.dpo
        self.reference_free = self.config.loss_type in REFERENCE_FREE
        self.unpaired = self.config.loss_type == "kto"
        if self.unpaired:
            self.unit = "rows"
        self.reference: dict[str, Any] | None = None
        """{"train": float64 tensor [side rows], "validation": ...}, set before the first step
        (never for a reference-free loss)."""

    def tables(self, prepared: Prepared) -> tuple[PairTable, PairTable | None]:
        """The prepared side rows read as pairs: a pair is an item of the plan."""
        train, validation = row_tables(prepared)
        return PairTable(train), PairTable(validation) if validation is not None else None

    def setup_model(self, model: Any, *, tokenizer: Any, runtime: Runtime, dist: Dist) -> None:
        """Nothing: no second model is held."""

    def begin(self, parts: Components) -> None:
        """The reference pass, unless a checkpoint brought the values back (or the loss takes
        no reference)."""
        if self.reference is None and not self.reference_free:
            self.reference = references(
                parts.model,
                train=parts.train_rows,
                val=parts.val_rows,
                micro=parts.plan.micro_batch,
                pad_id=parts.pad_id,
                runtime=parts.runtime,
                dist=parts.dist,
            )

    def gradients(
        self, parts: Components, *, micro_batches: list[list[int]], step_rows: list[int], **_: Any
    ) -> tuple[Any, Any]:
        """The step's loss; its SFT part and reward sums as figures."""

        def loss_of(pairs: list[int]):
            return self.micro_loss(
                parts.model,
                parts.train_rows,
                pairs,
                step=step_rows,
                pad_id=parts.pad_id,
                runtime=parts.runtime,
                dist=parts.dist,
            )

        return backward_micro_batches(parts, micro_batches, loss_of=loss_of)

    def validate(self, parts: Components) -> tuple[float, dict[str, float]]:
        return self.evaluate(
            parts.model,
            parts.val_rows,
            micro=parts.plan.micro_batch,
            pad_id=parts.pad_id,
            runtime=parts.runtime,
            dist=parts.dist,
        )

    def state(self) -> dict[str, Any]:
        """The reference values, so a resumed run compares with the same reference (none for
        a reference-free loss)."""
        if self.reference_free:
            return {}
        return {REFERENCE_KEY: {k: v.tolist() for k, v in self.reference.items()}}

    def restore(self, state: dict[str, Any]) -> None:
        import torch

        if self.reference_free:
            return
        saved = state[REFERENCE_KEY]
        self.reference = {k: torch.tensor(v, dtype=torch.float64) for k, v in saved.items()}

    def terms(self, model, table: PairTable, pairs, *, split: str, pad_id: int, runtime):
        """(per-pair preference terms, chosen log-prob sums, chosen counts) of `pairs`, or
        None for a rank with no pair in this pass (it still runs the forward)."""
        import torch

        batch = device_batch(table, pairs, pad_id=pad_id, device=runtime.device)
        logps = sequence_log_probs(model, batch, autocast=runtime.autocast)
        if not len(pairs):
            return None, logps
        c = self.config
        m = len(pairs)
        sides = table.side_indices(pairs)
        counts = torch.as_tensor(
            table.rows.target_counts[sides], dtype=torch.float32, device=logps.device
        )
        policy, ref = logps, None
        if not self.reference_free:
            ref = self.reference[split][sides].to(device=logps.device, dtype=torch.float32)
        if c.preference_average_log_probs:  # always for orpo and simpo (the schema's rule)
            policy = policy / counts.clamp(min=1)
            ref = ref / counts.clamp(min=1) if ref is not None else None
        terms = preference_loss(
            policy[:m],
            policy[m:],
            *((ref[:m], ref[m:]) if ref is not None else ()),
            beta=c.ref_policy_kl_penalty,
            loss_type=c.loss_type,
            label_smoothing=c.label_smoothing,
            simpo_gamma=c.simpo_gamma,
        )
        return terms, (logps[:m], counts[:m])

    def kto_terms(self, model, table: PairTable, rows, *, split: str, pad_id, runtime, dist):
        """(per-row KTO terms, or None for a rank with no row in this pass, and the policy's
        log-probs). The reference point is reduced over the data-parallel ranks here."""
        import torch

        batch = device_batch(table, rows, pad_id=pad_id, device=runtime.device)
        logps = sequence_log_probs(model, batch, autocast=runtime.autocast)
        m = len(rows)
        sides = table.side_indices(rows)
        policy = logps if m else logps[:0]
        ref = self.reference[split][sides].to(device=logps.device, dtype=torch.float32)
        if self.config.preference_average_log_probs:
            counts = torch.as_tensor(
                table.rows.target_counts[sides], dtype=torch.float32, device=logps.device
            ).clamp(min=1)
            policy, ref = policy / counts, ref / counts
        kl = kto_reference_point(policy[m:], ref[m:], reduce=dist.sum_over_data)
        if not m:
            return None, logps
        c = self.config
        desirable = torch.as_tensor(table.desirable[[int(i) for i in rows]], device=logps.device)
        terms = kto_loss(
            policy[:m],
            ref[:m],
            desirable,
            kl=kl,
            beta=c.ref_policy_kl_penalty,
            desirable_weight=c.desirable_weight,
            undesirable_weight=c.undesirable_weight,
        )
        return terms, logps

    def kto_micro_loss(self, model, table: PairTable, rows, *, step, pad_id, runtime, dist):
        """This micro-batch's share of the mean KTO loss over the step's rows, and of its
        `kto_sums`."""
        import torch

        terms, logps = self.kto_terms(
            model, table, rows, split="train", pad_id=pad_id, runtime=runtime, dist=dist
        )
        if terms is None:
            return 0.0 * logps.sum(), torch.zeros(KTO_SUMS, device=logps.device)
        n = max(len(step), 1)
        loss = self.config.preference_loss_weight * terms.loss.sum() / n
        return loss, kto_sums(terms) / n

    def micro_loss(self, model, table: PairTable, pairs, *, step, pad_id, runtime, dist):
        """This micro-batch's share of the loss of the step's pairs `step` (every rank's): a
        mean over them plus the weighted SFT part; and its share of [SFT loss, *reward means]."""
        import torch

        if self.unpaired:
            return self.kto_micro_loss(
                model, table, pairs, step=step, pad_id=pad_id, runtime=runtime, dist=dist
            )
        c = self.config
        terms, chosen = self.terms(
            model, table, pairs, split="train", pad_id=pad_id, runtime=runtime
        )
        if terms is None:  # keeps the graph (and every rank's collectives) for an empty pass
            return 0.0 * chosen.sum(), torch.zeros(PARTS, device=chosen.device)
        logps, counts = chosen
        n = max(len(step), 1)
        loss = c.preference_loss_weight * terms.loss.sum() / n
        if terms.nll is not None:  # orpo: the NLL term is in its loss already
            sft = terms.nll.sum() / n
        else:
            sft = self.sft_sum(logps, counts) / self.sft_count(table, step)
        if c.sft_loss_weight > 0:
            loss = loss + c.sft_loss_weight * sft
        parts = torch.cat([sft.detach().reshape(1), reward_sums(terms) / n])
        return loss, parts

    def sft_sum(self, logps, counts):
        """Negative log-likelihood of chosen sides, summed: over their tokens, or
        (sft_average_log_probs) over each side's own per-token mean."""
        if self.config.sft_average_log_probs:
            return -(logps / counts.clamp(min=1)).sum()
        return -logps.sum()

    def sft_count(self, table: PairTable, pairs) -> int:
        """What `sft_sum` over `pairs` is divided by: their pairs, or their chosen tokens."""
        if self.config.sft_average_log_probs:
            return max(len(pairs), 1)
        return max(int(table.chosen_counts[pairs].sum()), 1)

    def figures(self, sums: list[float]) -> dict[str, float]:
        """The step's metrics from the summed parts."""
        if self.unpaired:
            return kto_figures(sums)
        out = dict(zip(REWARD_KEYS, sums[1:], strict=True))
        if self.config.sft_loss_weight > 0 or self.config.loss_type == "orpo":
            out[SFT_KEY] = sums[0]
        return out

    def evaluate(self, model, table: PairTable, *, micro: int, pad_id: int, runtime, dist):
        """Mean loss and reward figures over every validation pair (ranks share the pairs in
        the same number of passes; the model is left in its former mode)."""
        import torch

        if self.unpaired:
            return self.kto_evaluate(
                model, table, micro=micro, pad_id=pad_id, runtime=runtime, dist=dist
            )
        c = self.config
        total = torch.zeros(2 + len(REWARD_KEYS), dtype=torch.float32, device=runtime.device)
        shard = (dist.dp_rank, dist.dp_size)
        for pairs in inference_passes(model, len(table), micro=micro, shard=shard):
            terms, chosen = self.terms(
                model, table, pairs, split="validation", pad_id=pad_id, runtime=runtime
            )
            if terms is None:
                continue
            sft = terms.nll.sum() if terms.nll is not None else self.sft_sum(*chosen)
            loss = c.preference_loss_weight * terms.loss.sum()
            total += torch.cat([loss.reshape(1), sft.reshape(1), reward_sums(terms)])
        total = dist.sum_over_data(total).tolist()
        n = max(len(table), 1)
        if c.loss_type == "orpo":  # a mean over pairs, in the loss already
            sft, weight = total[1] / n, 0.0
        else:
            sft = total[1] / self.sft_count(table, list(range(len(table))))
            weight = c.sft_loss_weight
        loss = total[0] / n + weight * sft
        return loss, self.figures([sft, *(x / n for x in total[2:])])

    def kto_evaluate(self, model, table: PairTable, *, micro: int, pad_id: int, runtime, dist):
        """Mean KTO loss and figures over every validation row (z per pass, as in training)."""
        import torch

        total = torch.zeros(1 + KTO_SUMS, dtype=torch.float32, device=runtime.device)
        shard = (dist.dp_rank, dist.dp_size)
        for rows in inference_passes(model, len(table), micro=micro, shard=shard):
            terms, _ = self.kto_terms(
                model, table, rows, split="validation", pad_id=pad_id, runtime=runtime, dist=dist
            )
            if terms is not None:
                loss = self.config.preference_loss_weight * terms.loss.sum()
                total += torch.cat([loss.float().reshape(1), kto_sums(terms)])
        total = dist.sum_over_data(total).tolist()
        return total[0] / max(len(table), 1), kto_figures(total[1:])


def reference_log_probs(model, rows: RowTable, *, micro: int, pad_id: int, runtime, dist):
    """Every side row's log-probability under `model` as it is now (no gradients; each
    data-parallel rank computes rows rank, rank+size, ... and the ranks sum)."""
    import torch

    out = torch.zeros(len(rows), dtype=torch.float64, device=runtime.device)
    shard = (dist.dp_rank, dist.dp_size)
    for chunk in inference_passes(model, len(rows), micro=micro, shard=shard):
        batch = device_batch(rows, chunk, pad_id=pad_id, device=runtime.device)
        logps = sequence_log_probs(model, batch, autocast=runtime.autocast)
        if chunk:
            out[torch.as_tensor(chunk, device=out.device)] = logps.double()
    return dist.sum_over_data(out).cpu()


def references(
    model, *, train: PairTable, val: PairTable | None, micro: int, pad_id, runtime, dist
):
    """{"train": ..., "validation": ...}: `reference_log_probs` of both splits' side rows."""
    out = {
        "train": reference_log_probs(
            model, train.rows, micro=2 * micro, pad_id=pad_id, runtime=runtime, dist=dist
        )
    }
    if val is not None:
        out["validation"] = reference_log_probs(
            model, val.rows, micro=2 * micro, pad_id=pad_id, runtime=runtime, dist=dist
        )
    return out
