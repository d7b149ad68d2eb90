"""Batched generation with a KV cache: what `generate`, `chat`, `eval` and reinforcement
learning's rollouts call.

Prompts (token ids, already rendered) are sorted by length and run `batch_size` at a time,
left-padded, through transformers' own `generate` (its KV cache, its samplers); the answers come
back in the input order, cut at the first stop token (not kept) or stop string.

With `row_seeds` every prompt samples on its own (`RowSampler`): a row's tokens then depend on
its seed and its own logits only, not on which rows share its batch, so data-parallel ranks
that split prompts differently sample what one process samples.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tuneplex.inference.prompts import Stop


@dataclass(frozen=True, kw_only=True)
class Sampling:
    """How the next token is picked: greedy at temperature 0, else sampled."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    """0: no top-k cut."""
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class Completion:
    ids: list[int]
    """The generated token ids, the stop token not included."""
    text: str
    stopped: bool
    """It ended on a stop token or string (else it ran out of `max_new_tokens`)."""
    end: list[int] = field(default_factory=list)
    """The generated ids that ended it (the stop token, or a stop string's tokens): what a
    model trained on its own completions learns to end with."""
    log_probs: list[float] | None = None
    """With `log_probs`: the sampler's log-probability of each of `ids + end` (temperature
    applied, before any top-k / top-p cut)."""


class Generator:
    """One loaded model generating for many prompts."""

    def __init__(self, model: Any, tokenizer: Any, *, stop: Stop, device: Any, autocast=None):
        self.model, self.tok, self.stop = model, tokenizer, stop
        self.device, self.autocast = device, autocast
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else (stop.token_ids or (0,))[0])

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        sampling: Sampling,
        *,
        batch_size: int = 8,
        progress: Callable[[int], None] | None = None,
        row_seeds: Sequence[int] | None = None,
        log_probs: bool = False,
    ) -> list[Completion]:
        """One completion per prompt, in the prompts' order; `progress(n)` after each batch of
        n prompts. `row_seeds`: one seed per prompt, each sampled on its own (`RowSampler`);
        `log_probs`: each completion's tokens' log-probabilities (needs `row_seeds`)."""
        if not prompts:
            return []
        if log_probs and row_seeds is None:
            raise ValueError("log_probs needs row_seeds")
        _seed(sampling)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
        out: list[Completion | None] = [None] * len(prompts)
        for at in range(0, len(order), batch_size):
            chunk = order[at : at + batch_size]
            sampler = None
            if row_seeds is not None:
                sampler = RowSampler([row_seeds[i] for i in chunk], sampling, log_probs=log_probs)
            rows = self._run([prompts[i] for i in chunk], sampling, sampler=sampler)
            for k, (i, ids) in enumerate(zip(chunk, rows, strict=True)):
                out[i] = self._finish(ids, sampler.row_log_probs(k) if log_probs else None)
            if progress is not None:
                progress(len(chunk))
        return [c for c in out if c is not None]

    def stream(
        self, prompt: Sequence[int], sampling: Sampling, *, on_text: Callable[[str], None]
    ) -> Completion:
        """One completion, its text handed to `on_text` piece by piece as it is generated."""
        _seed(sampling)
        streamer = _TextStream(self, on_text)
        ids = self._run([prompt], sampling, streamer=streamer)[0]
        done = self._finish(ids)
        streamer.flush(done.text)
        return done

    # -- internals ---------------------------------------------------------------------
    def _run(
        self, prompts: list[Sequence[int]], sampling: Sampling, *, streamer=None, sampler=None
    ):
        import torch

        from tuneplex.nn.evaluation import autocast_context

        longest = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), longest), dtype=torch.long)
        for i, p in enumerate(prompts):
            if p:
                input_ids[i, longest - len(p) :] = torch.tensor(list(p), dtype=torch.long)
                mask[i, longest - len(p) :] = 1
        with torch.inference_mode(), autocast_context(self.device, self.autocast):
            extra = {}
            if sampler is not None:  # it samples; transformers takes its one allowed token
                from transformers import LogitsProcessorList

                extra["logits_processor"] = LogitsProcessorList([sampler])
            sequences = self.model.generate(
                input_ids=input_ids.to(self.device),
                attention_mask=mask.to(self.device),
                generation_config=self._config(sampling, greedy=sampler is not None),
                streamer=streamer,
                **extra,
                **({"tokenizer": self.tok} if self.stop.strings else {}),
            )
        return [row[longest:].tolist() for row in sequences.cpu()]

    def _config(self, sampling: Sampling, *, greedy: bool = False):
        from transformers import GenerationConfig

        sample = not (sampling.greedy or greedy)
        return GenerationConfig(
            max_new_tokens=sampling.max_new_tokens,
            do_sample=sample,
            temperature=sampling.temperature if sample else None,
            top_p=sampling.top_p if sample else None,
            top_k=(sampling.top_k or None) if sample else None,
            eos_token_id=list(self.stop.token_ids) or None,
            pad_token_id=self.pad_id,
            bos_token_id=self.tok.bos_token_id,
            stop_strings=list(self.stop.strings) or None,
            use_cache=True,
        )

    def _finish(self, ids: list[int], log_probs: list[float] | None = None) -> Completion:
        """Cut at the first stop token (not kept) or stop string (not kept)."""
        stops = set(self.stop.token_ids)
        stopped, end = False, []
        for k, t in enumerate(ids):
            if t in stops:
                ids, end, stopped = ids[:k], [t], True
                break
        text = self.tok.decode(ids, skip_special_tokens=False)
        for s in self.stop.strings:
            at = text.find(s)
            if at >= 0:
                through = _ids_within(self.tok, ids, text[: at + len(s)])
                text, stopped = text[:at], True
                ids = _ids_within(self.tok, ids, text)
                end = through[len(ids) :]
        if log_probs is not None:
            log_probs = log_probs[: len(ids) + len(end)]
        return Completion(ids=list(ids), text=text, stopped=stopped, end=end, log_probs=log_probs)


def _ids_within(tok, ids: list[int], text: str) -> list[int]:
    """The shortest prefix of `ids` whose text covers `text` (what a stop string cut off)."""
    for k in range(len(ids) + 1):
        if len(tok.decode(ids[:k], skip_special_tokens=False)) >= len(text):
            return ids[:k]
    return ids


class RowSampler:
    """A transformers logits processor that samples each row on its own: the row's n-th token
    is drawn with the uniform number `counter_uniform(seed, n)` by inverse transform over the
    row's distribution (the sampling's temperature, top-k and top-p), so what a row samples
    depends on its seed and its own logits only — and the whole batch is drawn with one
    cumulative sum, no per-row loop. It hands back a mask that leaves only the drawn token:
    greedy decoding then takes it. Optionally keeps each drawn token's log-probability under
    the temperature-scaled distribution (before any top-k / top-p cut)."""

    def __init__(self, seeds: Sequence[int], sampling: Sampling, *, log_probs: bool = False):
        self.seeds = [int(s) for s in seeds]
        self.sampling = sampling
        self.keep = log_probs
        self.picked: list[list[float]] = [[] for _ in seeds]
        self.drawn = 0

    def row_log_probs(self, row: int) -> list[float]:
        return self.picked[row]

    def __call__(self, input_ids, scores):
        import torch

        s = self.sampling
        scores = scores.float() / max(s.temperature, 1e-6)
        filtered = scores
        if s.top_k:
            kth = torch.topk(filtered, min(s.top_k, filtered.shape[-1]), dim=-1).values[:, -1:]
            filtered = filtered.masked_fill(filtered < kth, float("-inf"))
        if s.top_p < 1.0:
            ordered, index = torch.sort(filtered, descending=True, dim=-1)
            cumulative = ordered.softmax(-1).cumsum(-1)
            drop = cumulative - ordered.softmax(-1) >= s.top_p  # keep the token that crosses
            filtered = filtered.masked_fill(
                torch.zeros_like(drop).scatter(-1, index, drop), float("-inf")
            )
        cdf = filtered.softmax(-1).double().cumsum(-1)
        u = torch.tensor(
            [counter_uniform(seed, self.drawn) for seed in self.seeds],
            dtype=torch.float64,
            device=scores.device,
        )
        self.drawn += 1
        # the first token whose cumulative probability exceeds u (zero-probability tokens
        # have empty intervals and are never drawn)
        chosen = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1), right=True)
        chosen = chosen.clamp(max=scores.shape[-1] - 1)
        if self.keep:
            logps = scores.log_softmax(-1).gather(-1, chosen).squeeze(-1).tolist()
            for row, value in enumerate(logps):
                self.picked[row].append(value)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(-1, chosen, 0.0)


_MASK64 = (1 << 64) - 1


def counter_uniform(seed: int, n: int) -> float:
    """A uniform number in [0, 1) that is a fixed function of (seed, n): splitmix64 of the
    seed advanced n + 1 times (Steele, Lea & Flood 2014), so any draw of any row is made
    without the draws before it."""
    z = (seed + (n + 1) * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    z ^= z >> 31
    return (z >> 11) / float(1 << 53)


def _seed(sampling: Sampling) -> None:
    if sampling.seed is not None and not sampling.greedy:
        import torch

        torch.manual_seed(sampling.seed)


class _TextStream:
    """A transformers streamer: decodes the tokens generated so far and hands on the new text,
    holding back what may still turn out to be a stop string or half a character."""

    def __init__(self, gen: Generator, on_text: Callable[[str], None]):
        self.gen, self.on_text = gen, on_text
        self.ids: list[int] = []
        self.prompt_seen = False
        self.sent = 0
        self.ended = False
        self.hold = max((len(s) for s in gen.stop.strings), default=1) - 1

    def put(self, value) -> None:
        if not self.prompt_seen:  # the first call hands over the prompt
            self.prompt_seen = True
            return
        if self.ended:
            return
        for t in value.reshape(-1).tolist():
            if t in self.gen.stop.token_ids:
                self.ended = True
                break
            self.ids.append(t)
        text = self.gen.tok.decode(self.ids, skip_special_tokens=False)
        for s in self.gen.stop.strings:
            at = text.find(s)
            if at >= 0:
                text, self.ended = text[:at], True
        ready = len(text) if self.ended else max(len(text) - self.hold, 0)
        if text[:ready].endswith("\ufffd"):
            return
        if ready > self.sent:
            self.on_text(text[self.sent : ready])
            self.sent = ready

    def end(self) -> None:
        """Called by transformers when generation ends; `flush` hands on the rest."""

    def flush(self, text: str) -> None:
        if len(text) > self.sent:
            self.on_text(text[self.sent :])
            self.sent = len(text)
