"""prepare(): a DataSpec in, tokenized (and packed) train/validation splits out, cached on disk.

The cache key covers the data files' content, the tokenizer (vocabulary, special tokens, chat
template), the template and format options, max_seq_length and this pipeline's version, so a
rerun loads Arrow files in a moment and any change rebuilds.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import shutil
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneplex.data import formats, preference, sources, unpaired
from tuneplex.data.packing import pack
from tuneplex.data.spec import DataSpec, DataStats
from tuneplex.data.targets import IGNORE_INDEX
from tuneplex.data.templates import Encoder, prompt_text
from tuneplex.data.turns import TurnNotFound
from tuneplex.errors import Problem, UsageError, first_line

PIPELINE_VERSION = "2"
MAX_REPORTED = 20
CHUNK = 1024


@dataclass
class Split:
    examples: Any
    """datasets.Dataset of input_ids/labels, one example per row (after truncation/drops); for
    preference data two per pair, interleaved: 2i chosen, 2i+1 rejected (unpaired KTO data:
    2i the row, 2i+1 its mismatched pair, see `tuneplex.data.unpaired`)."""
    packed: Any | None
    """datasets.Dataset of packed rows (input_ids/labels/position_ids/seq_lens), if packing."""
    stats: DataStats

    @property
    def dataset(self):
        """What the trainer iterates: packed rows when packing, else the examples."""
        return self.packed if self.packed is not None else self.examples


@dataclass
class Prepared:
    train: Split
    validation: Split | None
    _tokenizer: Any

    @property
    def tokenizer(self):
        return self._tokenizer.get()


def cache_root() -> Path:
    env = os.environ.get("TUNEPLEX_CACHE")
    if env:
        return Path(env) / "data"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tuneplex" / "data"


def load_tokenizer(ref: str, *, trust_remote_code: bool = False, key: str = "model"):
    from transformers import AutoTokenizer

    local = Path(ref).expanduser().is_dir()
    try:
        return AutoTokenizer.from_pretrained(
            str(Path(ref).expanduser()) if local else ref,
            local_files_only=local or sources.hub_offline(),
            trust_remote_code=trust_remote_code,
        )
    except Exception as exc:
        where = (
            "not a local directory, and the Hub is offline"
            if (not local and sources.hub_offline())
            else first_line(exc)
        )
        raise UsageError(Problem(key, f"{ref}: cannot load a tokenizer ({where})")) from None


def tokenizer_fingerprint(tok) -> str:
    h = hashlib.blake2b(digest_size=16)
    backend = getattr(tok, "backend_tokenizer", None)
    h.update((backend.to_str() if backend is not None else repr(tok.get_vocab())).encode())
    h.update(
        json.dumps(
            {
                "cls": type(tok).__name__,
                "special": tok.special_tokens_map,
                "template": tok.chat_template,
                "bos": tok.bos_token_id,
                "eos": tok.eos_token_id,
            },
            sort_keys=True,
            default=str,
        ).encode()
    )
    return h.hexdigest()


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack")


def tokenizer_files_fingerprint(ref: str) -> str | None:
    """Content hash of a local tokenizer directory's files (weights skipped), so a cached run
    needs no tokenizer load at all; None for a hub id (then the loaded tokenizer is hashed)."""
    path = Path(ref).expanduser()
    if not path.is_dir():
        return None
    h = hashlib.blake2b(digest_size=16)
    for f in sorted(p for p in path.iterdir() if p.is_file()):
        if f.suffix.lower() in WEIGHT_SUFFIXES or f.name.startswith("."):
            continue
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return "files:" + h.hexdigest()


class _LazyTokenizer:
    def __init__(self, spec: DataSpec, tokenizer=None):
        self.spec, self._tok = spec, tokenizer

    def get(self):
        if self._tok is None:
            self._tok = load_tokenizer(
                self.spec.tokenizer, trust_remote_code=self.spec.trust_remote_code
            )
        return self._tok


def prepare(
    spec: DataSpec,
    *,
    tokenizer=None,
    use_cache: bool = True,
    report: Callable[[str], None] | None = None,
) -> Prepared:
    """Tokenized splits for `spec`. The tokenizer is loaded only if something must be built
    (or when `Prepared.tokenizer` is first used). `report` gets one line per thing the user
    should know about the data (`notes`), whether it was built now or read from the cache."""
    if spec.preference:
        preference.check_spec(spec)
    lazy = _LazyTokenizer(spec, tokenizer)
    tok_fp = None if tokenizer is not None else tokenizer_files_fingerprint(spec.tokenizer)
    if tok_fp is None:
        tok_fp = tokenizer_fingerprint(lazy.get())
    train = _split(spec, lazy, tok_fp, "train", use_cache=use_cache)
    validation = None
    if spec.validation is not None:
        validation = _split(spec, lazy, tok_fp, "validation", use_cache=use_cache)
    prepared = Prepared(train=train, validation=validation, _tokenizer=lazy)
    for line in notes(prepared, spec) if report else ():
        report(line)
    return prepared


def _split(
    spec: DataSpec, lazy: _LazyTokenizer, tok_fp: str, split: str, *, use_cache: bool
) -> Split:
    ref = spec.train if split == "train" else spec.validation
    key = spec.train_key if split == "train" else spec.validation_key
    source = sources.resolve(ref, key=key)
    cache_key = hashlib.sha256(
        json.dumps(
            {
                "v": PIPELINE_VERSION,
                "spec": spec.key_dict(split),
                "data": source.fingerprint(),
                "tokenizer": tok_fp,
            },
            sort_keys=True,
        ).encode()
    ).hexdigest()[:32]
    where = cache_root() / cache_key
    if use_cache and (where / "stats.json").is_file():
        return _load(where)
    rows = sources.read_rows(source, key=key)
    if not rows:
        raise UsageError(Problem(key, f"{ref}: no rows"))
    split_data = build(rows, spec, lazy.get(), key=key)
    if use_cache:
        _save(split_data, where)
    return split_data


def build(rows: list[tuple[str, dict]], spec: DataSpec, tok, *, key: str) -> Split:
    """Rows -> examples -> tokens and labels -> truncated, filtered, packed. No caching.

    Every row that cannot be read, rendered or masked is found in one pass and reported
    together (or left out and counted, under `spec.skip_invalid_rows`)."""
    if spec.preference and spec.unpaired:
        return _build_unpaired(rows, spec, tok, key=key)
    if spec.preference:
        return _build_pairs(rows, spec, tok, key=key)
    if spec.prompts:
        return _build_prompts(rows, spec, tok, key=key)
    stats = DataStats(rows=len(rows))
    problems, normalised, row_of = _normalise_all(rows, spec, stats, formats.normalise)
    encoder = Encoder(tok, spec)
    encoder.calibrate([(fmt, ex) for _, fmt, ex in normalised[:64]])
    limit = spec.max_seq_length
    input_ids: list = []
    labels: list = []
    encoded = _encode_all(encoder, normalised)
    for index, (where, fmt, _), result in zip(row_of, normalised, encoded, strict=True):
        if isinstance(result, Problem):
            problems.append((index, result))
            stats.formats[fmt] -= 1
            continue
        ids, lab, drops = result
        _count_drops(stats, where, drops)
        if len(ids) > limit:
            stats.truncated += 1
            ids, lab = ids[:limit], lab[:limit]
        trained = int((lab != IGNORE_INDEX).sum())
        if trained == 0:
            stats.dropped_no_trained_tokens += 1
            continue
        stats.tokens += len(ids)
        stats.trained_tokens += trained
        input_ids.append(ids)
        labels.append(lab)
    _settle(problems, spec, stats, key)
    stats.examples = len(input_ids)
    if not input_ids:
        left_out = f", {stats.skipped_invalid_rows} left out" if stats.skipped_invalid_rows else ""
        raise UsageError(
            Problem(
                key,
                (
                    f"no example has a trained token ({stats.rows} rows, "
                    f"{stats.dropped_no_trained_tokens} without an answer after truncation to "
                    f"{limit} tokens{left_out})"
                ),
            )
        )
    examples = _dataset({"input_ids": input_ids, "labels": labels})
    packed = None
    if spec.packing:
        rows = pack(list(zip(input_ids, labels, strict=True)), limit)
        packed = _dataset(
            {k: [r[k] for r in rows] for k in ("input_ids", "labels", "position_ids", "seq_lens")}
        )
        stats.packed_rows = len(rows)
        stats.packing_efficiency = round(stats.tokens / (len(rows) * limit), 4)
    return Split(examples=examples, packed=packed, stats=stats)


def _build_pairs(rows: list[tuple[str, dict]], spec: DataSpec, tok, *, key: str) -> Split:
    """Preference rows -> their two sides, each encoded as an SFT example and truncated on its
    own -> examples interleaved: 2i is pair i's chosen side, 2i+1 its rejected side. A pair
    with a side that cannot be used is a bad row (not silently dropped: its other side would
    train alone)."""
    preference.check_spec(spec)
    stats = DataStats(rows=len(rows), pairs=0, chosen_tokens=0, rejected_tokens=0)
    problems, normalised, row_of = _normalise_all(rows, spec, stats, preference.normalise)
    sides = [(where, fmt, example) for where, fmt, pair in normalised for example in pair]
    encoder = Encoder(tok, spec)
    encoder.calibrate([(fmt, ex) for _, fmt, ex in sides[:64]])
    limit = spec.max_seq_length
    columns: dict[str, list] = {"input_ids": [], "labels": []}
    encoded = iter(_encode_all(encoder, sides))
    for index, (where, fmt, _) in zip(row_of, normalised, strict=True):
        results = [next(encoded), next(encoded)]
        bad = next((r for r in results if isinstance(r, Problem)), None)
        cut = [(ids[:limit], lab[:limit]) for ids, lab, _ in results] if bad is None else []
        bad = bad or preference.check_sides(where, cut, limit)
        if bad is not None:
            problems.append((index, bad))
            stats.formats[fmt] -= 1
            continue
        _count_drops(stats, where, results[0][2] | results[1][2])
        stats.truncated += sum(len(ids) > limit for ids, _, _ in results)
        trained = [int((lab != IGNORE_INDEX).sum()) for _, lab in cut]
        stats.chosen_tokens += trained[0]
        stats.rejected_tokens += trained[1]
        stats.tokens += sum(len(ids) for ids, _ in cut)
        stats.trained_tokens += sum(trained)
        for ids, lab in cut:
            columns["input_ids"].append(ids)
            columns["labels"].append(lab)
    _settle(problems, spec, stats, key)
    stats.pairs = len(columns["input_ids"]) // 2
    stats.examples = 2 * stats.pairs
    if not stats.pairs:
        raise UsageError(
            Problem(
                key,
                f"no usable preference pair ({stats.rows} rows, "
                f"{stats.skipped_invalid_rows} left out)",
            )
        )
    return Split(examples=_dataset(columns), packed=None, stats=stats)


def _build_unpaired(rows: list[tuple[str, dict]], spec: DataSpec, tok, *, key: str):
    """Unpaired KTO rows (`tuneplex.data.unpaired`) -> [row i, row i's completion after row
    (i+1) mod n's prompt] encoded as SFT examples and truncated, interleaved, with a
    `desirable` column. A row that cannot be used is a bad row, as in every format; so is a
    row of another form than the first one's."""
    preference.check_spec(spec)
    stats = DataStats(rows=len(rows), desirable=0, undesirable=0)
    problems, normalised, row_of = _normalise_all(rows, spec, stats, unpaired.normalise)
    encoder = Encoder(tok, spec)
    encoder.calibrate([(fmt, unpaired.example(fmt, r, r)) for _, fmt, r in normalised[:64]])
    limit = spec.max_seq_length
    form = normalised[0][1] if normalised else None
    kept: list[tuple[str, dict, tuple]] = []
    encoded = _encode_all(encoder, [(w, f, unpaired.example(f, r, r)) for w, f, r in normalised])
    for index, (where, fmt, row), result in zip(row_of, normalised, encoded, strict=True):
        bad = result if isinstance(result, Problem) else None
        if bad is None and fmt != form:
            bad = Problem(where, unpaired.other_form(fmt, form))
        if bad is None and not (result[1][:limit] != IGNORE_INDEX).any():
            bad = Problem(
                where, f"completion has no trained token after truncation to {limit} tokens"
            )
        if bad is not None:
            problems.append((index, bad))
            stats.formats[fmt] -= 1
            continue
        _count_drops(stats, where, result[2])
        kept.append((where, row, result))
    _settle(problems, spec, stats, key)
    if not kept:
        raise UsageError(
            Problem(
                key, f"no usable kto row ({stats.rows} rows, {stats.skipped_invalid_rows} left out)"
            )
        )
    mismatched = [
        (where, form, unpaired.example(form, kept[(i + 1) % len(kept)][1], row))
        for i, (where, row, _) in enumerate(kept)
    ]
    columns: dict[str, list] = {"input_ids": [], "labels": []}
    desirable: list[bool] = []
    for (where, row, own), other in zip(kept, _encode_all(encoder, mismatched), strict=True):
        if isinstance(other, Problem):
            raise UsageError(
                Problem(where, f"its completion after the next row's prompt: {other.message}")
            )
        stats.truncated += len(own[0]) > limit
        for ids, lab, _ in (own, other):
            ids, lab = ids[:limit], lab[:limit]
            columns["input_ids"].append(ids)
            columns["labels"].append(lab)
            stats.tokens += len(ids)
            stats.trained_tokens += int((lab != IGNORE_INDEX).sum())
        desirable += [row["label"], row["label"]]
        stats.desirable += row["label"]
        stats.undesirable += not row["label"]
    stats.examples = len(columns["input_ids"])
    return Split(
        examples=_dataset(columns).add_column("desirable", desirable), packed=None, stats=stats
    )


PROMPT_COLUMNS = ("input_ids", "prompt", "reference", "columns")
"""A prompt split's columns: the rendered prompt's ids; what the user wrote; the reference
answer (null when the row has none); the row's other columns as one JSON object (what a reward
function is given, as TRL gives a dataset's columns)."""


def _build_prompts(rows: list[tuple[str, dict]], spec: DataSpec, tok, *, key: str) -> Split:
    """Rows -> prompts rendered as training renders what comes before an answer, with the
    generation prompt. A row with no prompt (a text row), with a prompt longer than
    max_seq_length, or without the reference the reward needs is a bad row."""
    stats = DataStats(rows=len(rows), prompts=0)
    problems, normalised, row_of = _normalise_all(rows, spec, stats, _prompt_example)
    encoder = Encoder(tok, spec)
    encoder.calibrate([])
    limit = spec.max_seq_length
    columns: dict[str, list] = {name: [] for name in PROMPT_COLUMNS}
    for index, (where, fmt, (example, reference, others)) in zip(row_of, normalised, strict=True):
        try:
            ids = encoder.prompt_ids(fmt, example)
        except UsageError:
            raise
        except Exception as exc:  # jinja raise_exception and friends
            ids = Problem(where, f"chat template error: {first_line(exc)}")
        if not isinstance(ids, Problem) and len(ids) >= limit:
            ids = Problem(
                where,
                f"the prompt has {len(ids):,} tokens, max_seq_length is {limit:,}; shorten it "
                "or raise max_seq_length",
            )
        if isinstance(ids, Problem):
            problems.append((index, ids))
            stats.formats[fmt] -= 1
            continue
        stats.tokens += len(ids)
        columns["input_ids"].append(ids)
        columns["prompt"].append(prompt_text(fmt, example))
        columns["reference"].append(reference)
        columns["columns"].append(json.dumps(others, ensure_ascii=False, default=str))
    _settle(problems, spec, stats, key)
    stats.prompts = stats.examples = len(columns["input_ids"])
    if not stats.prompts:
        raise UsageError(
            Problem(
                key, f"no usable prompt ({stats.rows} rows, {stats.skipped_invalid_rows} left out)"
            )
        )
    texts = {name: columns.pop(name) for name in ("prompt", "reference", "columns")}
    return Split(examples=_dataset(columns, texts=texts), packed=None, stats=stats)


def _prompt_example(row: dict, where: str, spec: DataSpec):
    """(format, (example, reference, other columns)) of a prompt row."""
    fmt, example, answer = formats.prompt_of(row, where, spec)
    if fmt == "text":
        raise UsageError(
            Problem(
                where,
                f"a text row ({formats.cols(row)}) holds no prompt; expected chat messages "
                "ending with a user turn, a 'prompt' (or 'input') column, or "
                "dataset.column_mapping",
            )
        )
    column = spec.reference_column
    if column is not None:
        answer = (
            formats.reference_of(row, column=column, where=where, what="the reward's reference")
            if spec.reference_required
            else formats.reference_text(row.get(column))
        )
    elif spec.reference_required and formats.reference_text(answer) is None:
        raise UsageError(
            Problem(
                where,
                "no reference answer for the reward (the row's answer: a completion / output, "
                "the column_mapping answer or a final assistant message); or name its column "
                "in the environment's reference_column",
            )
        )
    used = {spec.messages_field, spec.tools_field, "prompt", "input"}
    if spec.column_mapping:
        used |= {c for role, c in spec.column_mapping.items() if c and role != "answer"}
    others = {k: v for k, v in row.items() if k not in used}
    return fmt, (example, answer, others)


def _normalise_all(
    rows: list[tuple[str, dict]],
    spec: DataSpec,
    stats: DataStats,
    normalise: Callable[[dict, str, DataSpec], tuple[str, Any]],
):
    """(problems as (row index, Problem), [(where, format, example)], each one's row index),
    formats counted in `stats`."""
    problems: list[tuple[int, Problem]] = []
    normalised: list[tuple[str, str, Any]] = []
    row_of: list[int] = []
    for index, (where, row) in enumerate(rows):
        if isinstance(row, Problem):  # a line that is no row at all
            problems.append((index, row))
            continue
        try:
            fmt, example = normalise(row, where, spec)
        except UsageError as exc:
            problems.append((index, exc.problems[0]))
            continue
        stats.formats[fmt] = stats.formats.get(fmt, 0) + 1
        normalised.append((where, fmt, example))
        row_of.append(index)
    return problems, normalised, row_of


def _count_drops(stats: DataStats, where: str, drops) -> None:
    for kind in drops:
        seen = stats.template_drops.setdefault(kind, {"rows": 0, "first": where})
        seen["rows"] += 1


def _settle(problems: list[tuple[int, Problem]], spec: DataSpec, stats: DataStats, key: str):
    """Report the rows that cannot be used, all at once, or count them as left out."""
    if not problems:
        return
    problems.sort(key=lambda p: p[0])
    if not spec.skip_invalid_rows:
        raise UsageError(report_problems(key, [p for _, p in problems], stats.rows))
    stats.skipped_invalid_rows = len(problems)
    stats.first_skipped = str(problems[0][1])
    stats.formats = {f: n for f, n in stats.formats.items() if n}


def report_problems(key: str, problems: list[Problem], rows: int) -> list[Problem]:
    """The first rows that cannot be used, one line each, then how many there are in all."""
    if len(problems) == 1:
        return problems
    lines = problems[:MAX_REPORTED]
    if len(problems) > MAX_REPORTED:
        lines.append(Problem("", f"... and {len(problems) - MAX_REPORTED:,} more rows"))
    way_out = (
        "map their prompt and answer columns with --column-mapping"
        if key.startswith("--")  # a command's data file, not a job's
        else "set dataset.skip_invalid_rows: true to leave them out (counted in the stats)"
    )
    lines.append(
        Problem(key, f"{len(problems):,} of {rows:,} rows cannot be used; fix them, or {way_out}")
    )
    return lines


def notes(prepared: Prepared, spec: DataSpec) -> list[str]:
    """One line per thing the user should know about the data: rows the chat template leaves
    text out of, rows left out as invalid."""
    out = []
    splits = ((prepared.train, spec.train_key), (prepared.validation, spec.validation_key))
    for split, key in splits:
        if split is None:
            continue
        s = split.stats
        for kind, seen in sorted(s.template_drops.items()):
            out.append(
                f"{key}: the chat template drops {kind} ({seen['rows']:,} of {s.rows:,} rows; "
                f"first: {seen['first']})"
            )
        if s.skipped_invalid_rows:
            out.append(
                f"{key}: left out {s.skipped_invalid_rows:,} of {s.rows:,} rows that cannot be "
                f"used (dataset.skip_invalid_rows); first: {s.first_skipped}"
            )
    return out


# -- encoding, in worker processes when there is enough work ---------------------------
_WORK: tuple[Encoder, list] | None = None
PARALLEL_MIN_ROWS = 4096


def _encode_range(bounds: tuple[int, int]):
    """Per row: (ids, labels, what the template dropped) or the Problem that row has. A setting
    that no row can satisfy (chats without a template) raises at once."""
    encoder, items = _WORK
    rendered: list = []
    for where, fmt, example in items[bounds[0] : bounds[1]]:
        try:
            rendered.append(encoder.render(fmt, example))
        except UsageError:
            raise
        except TurnNotFound as exc:
            rendered.append(
                Problem(
                    where,
                    f"cannot locate assistant turn {exc.turn} in the chat template's rendering "
                    f"({exc.why}); fix the row or use another template",
                )
            )
        except Exception as exc:  # jinja raise_exception and friends
            rendered.append(Problem(where, f"chat template error: {first_line(exc)}"))
    good = [r for r in rendered if not isinstance(r, Problem)]
    encoded = iter(encoder.encode_many(good))
    return [r if isinstance(r, Problem) else (*next(encoded), r.dropped) for r in rendered]


def _encode_all(encoder: Encoder, items: list):
    global _WORK
    bounds = [(i, min(i + CHUNK, len(items))) for i in range(0, len(items), CHUNK)]
    workers = min(
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1),
        8,
    )
    _WORK = (encoder, items)
    try:
        if workers > 1 and len(items) >= PARALLEL_MIN_ROWS and "fork" in mp.get_all_start_methods():
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
            with ProcessPoolExecutor(workers, mp_context=mp.get_context("fork")) as pool:
                results = list(pool.map(_encode_range, bounds))
        else:
            results = [_encode_range(b) for b in bounds]
    finally:
        _WORK = None
    for result in results:
        yield from result


def _dataset(columns: dict[str, list], *, texts: dict[str, list] | None = None):
    """A datasets.Dataset built straight from int32 arrays (no per-element Python work), with
    `texts` as string columns (None allowed)."""
    import datasets
    import numpy as np
    import pyarrow as pa

    arrays = {}
    for name, values in columns.items():
        lengths = np.fromiter((len(v) for v in values), dtype=np.int64, count=len(values))
        offsets = np.zeros(len(values) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        flat = np.concatenate(values).astype(np.int32) if values else np.zeros(0, np.int32)
        if offsets[-1] < 2**31:
            arrays[name] = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), flat)
        else:
            arrays[name] = pa.LargeListArray.from_arrays(pa.array(offsets), flat)
    for name, values in (texts or {}).items():
        arrays[name] = pa.array(values, type=pa.large_string())
    return datasets.Dataset(pa.table(arrays))


def _save(split: Split, where: Path) -> None:
    import datasets

    datasets.disable_progress_bars()
    tmp = where.with_name(where.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    split.examples.save_to_disk(str(tmp / "examples"))
    if split.packed is not None:
        split.packed.save_to_disk(str(tmp / "packed"))
    (tmp / "stats.json").write_text(json.dumps(split.stats.as_dict()))
    # the key names the content: a complete entry another process wrote meanwhile (two jobs
    # on the same data) is this one, and may be being read, so it stays
    if not (where / "stats.json").is_file():
        shutil.rmtree(where, ignore_errors=True)  # an incomplete one
        try:
            os.replace(tmp, where)
        except OSError:
            if not (where / "stats.json").is_file():
                raise
    shutil.rmtree(tmp, ignore_errors=True)


def _load(where: Path) -> Split:
    import datasets

    stats = DataStats(**json.loads((where / "stats.json").read_text()))
    examples = datasets.load_from_disk(str(where / "examples"))
    packed = datasets.load_from_disk(str(where / "packed")) if (where / "packed").is_dir() else None
    return Split(examples=examples, packed=packed, stats=stats)
