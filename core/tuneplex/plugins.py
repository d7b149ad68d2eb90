"""Discovering backends: entry points in the `tuneplex` group, loaded once per process."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from importlib import metadata
from typing import Any

import pluggy

from tuneplex import hookspecs
from tuneplex.backend import Backend
from tuneplex.errors import UsageError, did_you_mean, user_loc

ENTRY_POINT_GROUP = "tuneplex"

# where a backend that is not installed comes from, for the "pip install" hint; the default first
KNOWN_EXTRAS = {"automodel": "automodel", "unsloth": "unsloth"}
DEFAULT_BACKEND = "automodel"
"""The backend a job runs on when several are installed and the job fits more than one."""
NO_BACKENDS = "no backends installed; pip install 'tuneplex[automodel]' or 'tuneplex[unsloth]'"
FOREIGN_SHARE, FOREIGN_MIN = 0.5, 3
"""A job that fits no installed schema, of whose keys the pick's schema refuses at least this
share and this many, is taken for a job of a backend that is not installed (a typo is a key or
two; another backend's job is most of it)."""


@dataclass(frozen=True)
class InstalledBackend:
    backend: Backend
    plugin: str
    distribution: str
    version: str


class PluginConflict(UsageError):
    """Two plugins registered the same backend name."""


@dataclass
class Registry:
    backends: dict[str, InstalledBackend]
    failures: list[str]
    """One line per plugin that failed to load (already warned about)."""

    def get(self, name: str, *, where: str = "--backend") -> InstalledBackend:
        """The backend called `name`, or a one-line refusal naming `where` it was asked for."""
        try:
            return self.backends[name]
        except KeyError:
            raise UsageError(unknown_backend_message(name, self.backends, where=where)) from None

    def choose(self, name: str | None, job: Mapping[str, Any]) -> InstalledBackend:
        """The backend for a job: `name` (--backend) when given; else the one whose job schema
        `job` fits, when exactly one does; else the only one installed, or the default. A job
        that fits none and is mostly foreign to that pick (an automodel job where only unsloth
        is installed) is refused in one line naming the backend to install."""
        if name is not None:
            return self.get(name)
        if not self.backends:
            raise UsageError(NO_BACKENDS)
        names = sorted(self.backends)
        refused = {n: refused_keys(self.backends[n].backend.job_schema, job) for n in names}
        fits = [n for n in names if refused[n] is None]  # `fitting`, keeping the counts
        if len(fits) == 1:
            return self.backends[fits[0]]
        pool = fits or names
        pick = DEFAULT_BACKEND if DEFAULT_BACKEND in pool else pool[0]
        missing = [n for n in KNOWN_EXTRAS if n not in self.backends]  # the default first
        if not fits and missing and _foreign(*refused[pick]):
            raise UsageError(
                f"job: fits no installed backend; most of its keys are not {pick}'s (--backend "
                f"{pick} lists them): a job for {missing[0]}? installed: {', '.join(names)}; "
                f"install it with: pip install 'tuneplex[{KNOWN_EXTRAS[missing[0]]}]'"
            )
        return self.backends[pick]

    def fitting(self, job: Mapping[str, Any]) -> list[str]:
        """The installed backends whose job schema `job` fits, by name."""
        schemas = {n: b.backend.job_schema for n, b in self.backends.items()}
        return [n for n in sorted(schemas) if refused_keys(schemas[n], job) is None]


def refused_keys(schema: type, job: Mapping[str, Any]) -> tuple[int, int] | None:
    """None when `job` fits `schema`; else (refused, total): how many of its keys the schema
    refuses as unknown or of another shape (a mapping for a string, say), each required key the
    job lacks counted as one more, out of all its keys and those. (0, n) when only values are
    wrong."""
    from pydantic import ValidationError

    try:
        schema.model_validate(job)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
    else:
        return None
    foreign: set[tuple] = set()  # where the job's shape and the schema's part
    lacking = 0
    for err in errors:
        kind = err["type"]
        loc = user_loc(tuple(err.get("loc", ())), keep_last=kind == "extra_forbidden")
        if kind == "missing":
            lacking += 1
        elif kind in _SHAPE_ERRORS or (
            kind.endswith("_type") and isinstance(err.get("input"), Mapping)
        ):
            foreign.add(loc)
    keys = list(_leaves(job, ()))
    refused = sum(any(k[:i] in foreign for i in range(len(k) + 1)) for k in keys)
    return refused + lacking, len(keys) + lacking


def _foreign(refused: int, total: int) -> bool:
    return refused >= FOREIGN_MIN and refused >= FOREIGN_SHARE * total


_SHAPE_ERRORS = {"extra_forbidden", "model_type", "model_attributes_type", "dict_type"}


def _leaves(value: Any, path: tuple) -> Iterator[tuple]:
    """The paths of a job's values, as pydantic locates them (list items by index)."""
    if isinstance(value, Mapping) and value:
        for key, item in value.items():
            yield from _leaves(item, (*path, key))
    elif isinstance(value, list) and any(isinstance(item, Mapping) for item in value):
        for i, item in enumerate(value):
            yield from _leaves(item, (*path, i))
    else:
        yield path


def unknown_backend_message(
    name: str, installed: Iterable[str], *, where: str = "--backend"
) -> str:
    installed = sorted(installed)
    msg = f"{where}: unknown backend '{name}'" + did_you_mean(name, installed)
    msg += f"; installed: {', '.join(installed) if installed else 'none'}"
    if name in KNOWN_EXTRAS:
        msg += f"; install it with: pip install 'tuneplex[{KNOWN_EXTRAS[name]}]'"
    return msg


def load_registry(entry_points: Iterable[metadata.EntryPoint], *, warn=None) -> Registry:
    """Load each entry point's plugin module and collect the backends it registers.

    A plugin whose import fails is reported in one line and skipped; the others still load.
    """
    warn = warn or (lambda line: print(line, file=sys.stderr))
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    backends: dict[str, InstalledBackend] = {}
    failures: list[str] = []
    seen: set[str] = set()
    for ep in entry_points:
        if ep.name in seen:  # the same distribution visible twice on sys.path
            continue
        seen.add(ep.name)
        dist = getattr(ep, "dist", None)
        dist_name = dist.metadata["Name"] if dist is not None else "?"
        version = dist.version if dist is not None else "?"
        try:
            module = ep.load()
            pm.register(module, name=ep.name)
            registered: list[Backend] = []
            pm.hook.register_backends(register=registered.append)
            pm.unregister(module)  # each plugin is asked exactly once, on its own
        except Exception as exc:  # a broken plugin must not take the others down
            line = (
                f"tuneplex: warning: plugin '{ep.name}' ({dist_name}) failed to load: "
                f"{type(exc).__name__}: {exc}".splitlines()[0]
            )
            failures.append(line)
            warn(line)
            continue
        for backend in registered:
            if not isinstance(backend, Backend):
                line = (
                    f"tuneplex: warning: plugin '{ep.name}' registered {backend!r}, not a Backend"
                )
                failures.append(line)
                warn(line)
                continue
            if backend.name in backends:
                other = backends[backend.name]
                raise PluginConflict(
                    f"backend '{backend.name}' is registered by two plugins: "
                    f"'{other.plugin}' ({other.distribution}) and '{ep.name}' ({dist_name}); "
                    "uninstall one of them"
                )
            backends[backend.name] = InstalledBackend(backend, ep.name, dist_name, version)
    return Registry(backends=backends, failures=failures)


@cache
def registry() -> Registry:
    """The installed backends, discovered once per process."""
    return load_registry(metadata.entry_points(group=ENTRY_POINT_GROUP))
