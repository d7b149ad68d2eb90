"""A Hugging Face fast tokenizer as llama.cpp's vocabulary: tokens, types, merges or scores,
the pre-tokenizer's name, special ids and the chat template.

Read from the tokenizer's own `tokenizer.json` (its Rust backend), never from files beside a
model: what is written is what the user's tokenizer does. Two kinds are written:
- byte-level BPE (GPT-2, Llama 3, Qwen2, Granite): llama.cpp's "gpt2" model, with the merges and
  the name of a pre-tokenizer whose split regexes equal the tokenizer's;
- SentencePiece-style BPE with byte fallback (Llama 2, Mistral, Gemma, Phi-3): llama.cpp's
  "llama" model, whose merge order is carried by scores (a token's score is minus the rank of
  the first merge that makes it, so llama.cpp's highest-score-first pairing merges in the same
  order as the BPE's lowest-rank-first).
Anything else is refused in one line rather than written to tokenize differently.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+"
    r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
    r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZERS: dict[tuple, tuple[str, bool]] = {
    # canonical pre-tokenizer steps -> (llama.cpp's name, the `ignore_merges` it implies)
    (("bytelevel", True),): ("gpt-2", False),
    (("digits",), ("bytelevel", True)): ("refact", False),
    (("split", LLAMA3_SPLIT), ("bytelevel", False)): ("llama-bpe", True),
    (("split", QWEN2_SPLIT), ("bytelevel", False)): ("qwen2", False),
}
"""Each llama.cpp name splits text with the same regexes as these steps (llama-vocab.cpp)."""

SPIECE = "\u2581"
BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
# llama.cpp's TokenType values (gguf.TokenType), kept here so reading needs no gguf import
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


class VocabRefused(ValueError):
    """The tokenizer cannot be written as a vocabulary llama.cpp tokenizes identically."""


@dataclass(frozen=True)
class Vocab:
    model: str
    """llama.cpp's tokenizer model: "gpt2" (byte-level BPE) or "llama" (SentencePiece-style)."""
    tokens: list[str]
    types: list[int]
    pre: str | None = None
    merges: list[str] | None = None
    scores: list[float] | None = None
    add_space_prefix: bool | None = None
    notes: tuple[str, ...] = ()
    """Where llama.cpp tokenizes differently (said in the report)."""


@dataclass(frozen=True)
class Specials:
    bos: int | None
    eos: int | None
    eot: int | None
    """The end of turn the template trains (the first of the caller's eos ids)."""
    eom: int | None
    """A further end-of-turn id, when there is one llama.cpp has no other key for."""
    unk: int | None
    pad: int | None
    add_bos: bool
    add_eos: bool
    unmarked: tuple[int, ...] = ()
    """End-of-turn ids beyond those three keys (said in the report)."""


def read_vocab(tokenizer: Any, *, rows: int) -> Vocab:
    """The vocabulary of `rows` ids (the embedding's rows; ids the tokenizer lacks are written
    as unused placeholders). Raises VocabRefused."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise VocabRefused(f"a {model.get('type')} tokenizer model is not written to GGUF")
    by_id = {i: t for t, i in model["vocab"].items()}
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    by_id.update({i: a["content"] for i, a in added.items()})
    if max(by_id) >= rows:
        raise VocabRefused(f"the tokenizer has ids up to {max(by_id)}; the model embeds {rows}")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if model.get("byte_fallback"):
        return _sentencepiece(spec, by_id, added, merges, rows, tokenizer.unk_token_id)
    name, ignore = _pre_tokenizer(spec.get("pre_tokenizer"))
    if bool(model.get("ignore_merges", False)) != ignore or spec.get("normalizer"):
        raise VocabRefused(
            f"a {name}-style pre-tokenizer with other merge or normalizer settings than llama.cpp's"
        )
    tokens, types = _tokens(by_id, added, rows, unk=None)
    return Vocab(
        model="gpt2",
        tokens=tokens,
        types=types,
        pre=name,
        merges=merges,
        notes=_stripping(added),
    )


def _stripping(added: dict[int, dict]) -> tuple[str, ...]:
    """Added tokens that swallow the spaces beside them: llama.cpp reads no such flag."""
    names = [a["content"] for a in added.values() if a.get("lstrip") or a.get("rstrip")]
    if not names:
        return ()
    return (
        f"llama.cpp does not strip the spaces beside {', '.join(names[:5])}"
        f"{' ...' if len(names) > 5 else ''} as the tokenizer does",
    )


def _pre_tokenizer(pre: dict | None) -> tuple[str, bool]:
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre]
    canon: list[tuple] = []
    for step in steps:
        kind = (step or {}).get("type")
        if kind == "ByteLevel" and not step.get("add_prefix_space"):
            canon.append(("bytelevel", bool(step.get("use_regex", True))))
        elif kind == "Digits" and step.get("individual_digits"):
            canon.append(("digits",))
        elif kind == "Split" and step.get("behavior") == "Isolated" and not step.get("invert"):
            canon.append(("split", (step.get("pattern") or {}).get("Regex")))
        else:
            canon.append((kind,))
    found = PRE_TOKENIZERS.get(tuple(canon))
    if found is None:
        raise VocabRefused(
            f"pre-tokenizer {[c[0] for c in canon]} matches none llama.cpp implements "
            f"({', '.join(n for n, _ in PRE_TOKENIZERS.values())})"
        )
    return found


def _sentencepiece(spec, by_id, added, merges, rows, unk) -> Vocab:
    prefix, notes = _space_prefix(spec.get("normalizer"), spec.get("pre_tokenizer"))
    rank: dict[str, int] = {}
    for r, merge in enumerate(merges):
        left, _, right = merge.partition(" ")
        rank.setdefault(left + right, r)
    tokens, types = _tokens(by_id, added, rows, unk=unk)
    scores = [-float(rank[t]) if t in rank else 0.0 for t in tokens]
    return Vocab(
        model="llama",
        tokens=tokens,
        types=types,
        scores=scores,
        add_space_prefix=prefix,
        notes=notes + _stripping(added),
    )


def _space_prefix(normalizer: dict | None, pre: dict | None) -> tuple[bool, tuple[str, ...]]:
    """Whether text gets a leading ▁ as llama.cpp's `add_space_prefix` gives it: before every
    stretch of text that starts the input or follows a special token. That is the legacy
    normalizer (Prepend + Replace), or nearly Metaspace's "always"; Metaspace's "first" prefixes the
    input's start only, which llama.cpp cannot do: written without the prefix, so prompts that
    begin with a special token (as chat templates render them) tokenize alike."""
    norms = (normalizer or {}).get("normalizers", [normalizer] if normalizer else [])
    kinds = {n.get("type"): n for n in norms}
    replace = kinds.get("Replace")
    if replace is not None and replace.get("content") == SPIECE and not pre:
        if set(kinds) - {"Replace", "Prepend"}:
            raise VocabRefused("a SentencePiece-style normalizer llama.cpp does not reproduce")
        return kinds.get("Prepend", {}).get("prepend") == SPIECE, ()
    if pre and pre.get("type") == "Metaspace" and not normalizer:
        scheme = pre.get("prepend_scheme", "always")
        if scheme == "never":
            return False, ()
        if scheme == "always":  # Metaspace adds no ▁ where the text already starts with one
            return True, (
                "text that starts with a space after a special token (or at the start) gets "
                "one more ▁ from llama.cpp than from the tokenizer",
            )
        return False, (
            "the tokenizer puts SentencePiece's leading ▁ at the start of the input only; "
            "llama.cpp cannot, so text that starts a prompt with no special token before it "
            "is tokenized without that ▁",
        )
    raise VocabRefused("a byte-fallback tokenizer without SentencePiece's ▁ spaces")


def _tokens(by_id, added, rows, *, unk) -> tuple[list[str], list[int]]:
    tokens, types = [], []
    for i in range(rows):
        text = by_id.get(i)
        if text is None:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
            continue
        tokens.append(text)
        if i == unk:
            types.append(UNKNOWN)
        elif i in added:
            types.append(CONTROL if added[i].get("special") else USER_DEFINED)
        elif BYTE_TOKEN.fullmatch(text):
            types.append(BYTE)
        else:
            types.append(NORMAL)
    return tokens, types


def read_specials(tokenizer: Any, *, eos_ids: list[int]) -> Specials:
    """Special ids as llama.cpp reads them. The template's end of turn becomes eot (and eos when
    the tokenizer names none): llama.cpp stops at eos, eot and eom."""
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    turns = list(dict.fromkeys(eos_ids))
    eot = turns[0] if turns else None
    if eos is None:
        eos = eot
    rest = [i for i in turns if i not in (eos, eot)]
    return Specials(
        bos=bos,
        eos=eos,
        eot=eot,
        eom=rest[0] if rest else None,
        unk=tokenizer.unk_token_id,
        pad=tokenizer.pad_token_id,
        add_bos=bool(probe) and bos is not None and probe[0] == bos,
        add_eos=len(probe) > 1 and eos is not None and probe[-1] == eos,
        unmarked=tuple(rest[1:]),
    )


def write_vocab(writer: Any, *, vocab: Vocab, specials: Specials, chat_template: str | None):
    """Every tokenizer key llama.cpp reads, through the gguf library's writer."""
    writer.add_tokenizer_model(vocab.model)
    if vocab.pre is not None:
        writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    for key in ("bos", "eos", "eot", "eom", "unk", "pad"):
        value = getattr(specials, key)
        if value is not None:
            getattr(writer, f"add_{key}_token_id")(value)
    writer.add_add_bos_token(specials.add_bos)
    writer.add_add_eos_token(specials.add_eos)
    if chat_template:
        writer.add_chat_template(chat_template)
