"""What the pipeline is asked to do (from a job), and what it reports back."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

Format = Literal["auto", "prompt_completion", "column_mapped", "chat", "text"]
FORMATS: tuple[str, ...] = ("auto", "prompt_completion", "column_mapped", "chat", "text")

# prompt/completion key pairs recognised without configuration, in order of preference
DEFAULT_PAIRS: tuple[tuple[str, str], ...] = (("input", "output"), ("prompt", "completion"))


@dataclass(frozen=True)
class DataSpec:
    """Everything that decides the tokens and masks of a dataset (and so its cache key)."""

    train: str
    """Dataset reference: a .jsonl/.json/.parquet file, a directory of them, or a hub id."""
    tokenizer: str
    """Tokenizer reference: a local directory or a hub id (the model's)."""
    max_seq_length: int
    validation: str | None = None
    format: Format = "auto"
    column_mapping: dict[str, str] | None = None
    """{"context": col, "question": col, "answer": col}; context optional."""
    text_field: str = "text"
    messages_field: str = "messages"
    tools_field: str = "tools"
    chat_template: Literal["tokenizer", "passthrough", "none"] | str = "tokenizer"
    """tokenizer: the tokenizer's own; passthrough: contents concatenated; none: rows with
    messages are refused; any other string: a custom Jinja template."""
    packing: bool = False
    preference: bool = False
    """Rows are preference pairs (prompt, chosen, rejected; see `tuneplex.data.preference`):
    the examples are their sides, interleaved (2i chosen, 2i+1 rejected), never packed."""
    unpaired: bool = False
    """With `preference`: rows are unpaired KTO rows (prompt, completion, label; see
    `tuneplex.data.unpaired`): example 2i is row i, 2i+1 its completion after the next row's
    prompt (the KL term's mismatched pair), with a `desirable` column."""
    prompts: bool = False
    """Rows are prompts to generate for (reinforcement learning): each example is the rendered
    prompt with the generation prompt (no answer, nothing trained), its row's answer as the
    reference and its other columns kept for the reward (see `pipeline.PROMPT_COLUMNS`)."""
    reference_column: str | None = None
    """With `prompts`: the column holding each row's reference answer (None: the row's own)."""
    reference_required: bool = False
    """With `prompts`: a row without a reference is bad data (the reward compares with it)."""
    trust_remote_code: bool = False
    skip_invalid_rows: bool = False
    """Leave out (and count) rows that cannot be read, rendered or masked, instead of failing."""
    train_key: str = "dataset.training"
    validation_key: str = "dataset.validation"
    """Job keys named in error messages about the two references."""

    def key_dict(self, split: str) -> dict:
        data = asdict(self)
        for name in ("train", "validation", "train_key", "validation_key"):
            data.pop(name)
        data["source"] = self.train if split == "train" else self.validation
        return data


@dataclass
class DataStats:
    rows: int = 0
    examples: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    truncated: int = 0
    """Examples cut to max_seq_length (preference data: sides of the pairs kept)."""
    dropped_no_trained_tokens: int = 0
    formats: dict[str, int] = field(default_factory=dict)
    packed_rows: int | None = None
    packing_efficiency: float | None = None
    """Real tokens / (packed rows × max_seq_length)."""
    skipped_invalid_rows: int = 0
    """Rows left out under `skip_invalid_rows`; `first_skipped` says the first one and why."""
    first_skipped: str | None = None
    template_drops: dict[str, dict] = field(default_factory=dict)
    """What the chat template leaves out of rows: {"system messages": {"rows": n, "first":
    "file:line"}, ...}."""
    pairs: int | None = None
    """Preference data only (None otherwise): pairs kept; `examples` is twice this."""
    chosen_tokens: int | None = None
    """Preference data: trained tokens of all chosen sides (`rejected_tokens`: rejected sides);
    their difference over `pairs` says how much longer the chosen answers are."""
    rejected_tokens: int | None = None
    desirable: int | None = None
    """Unpaired KTO data only (None otherwise): rows labelled true kept (`undesirable`: false)."""
    undesirable: int | None = None
    prompts: int | None = None
    """Prompt data only (None otherwise): prompts kept (= examples)."""

    def as_dict(self) -> dict:
        data = asdict(self)
        if self.pairs is None:  # other data's stats read as they always have
            for name in PREFERENCE_STATS:
                data.pop(name)
        if self.desirable is None:
            for name in UNPAIRED_STATS:
                data.pop(name)
        if self.prompts is None:
            for name in PROMPT_STATS:
                data.pop(name)
        return data


PREFERENCE_STATS = ("pairs", "chosen_tokens", "rejected_tokens")
UNPAIRED_STATS = ("desirable", "undesirable")
PROMPT_STATS = ("prompts",)
