"""Discovering backends: entry points in the `tuneplex` group, loaded once per process."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from importlib import metadata
from typing import Any

import pluggy

from tuneplex import hookspecs
from tuneplex.backend import Backend
from tuneplex.errors import UsageError, did_you_mean

ENTRY_POINT_GROUP = "tuneplex"

# where a backend that is not installed comes from, for the "pip install" hint
KNOWN_EXTRAS = {"automodel": "automodel", "unsloth": "unsloth"}
DEFAULT_BACKEND = "automodel"
"""The backend a job runs on when several are installed and the job fits more than one."""


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

    def get(self, name: str) -> InstalledBackend:
        try:
            return self.backends[name]
        except KeyError:
            raise UsageError(unknown_backend_message(name, self.backends)) from None

    def choose(self, name: str | None, job: Mapping[str, Any]) -> InstalledBackend:
        """The backend for a job: `name` (--backend) when given; else the only one installed;
        else the one whose job schema `job` fits, when exactly one does; else the default."""
        if name is not None:
            return self.get(name)
        names = sorted(self.backends)
        if len(names) == 1:
            return self.backends[names[0]]
        fits = [n for n in names if _fits(self.backends[n].backend.job_schema, job)]
        if len(fits) == 1:
            return self.backends[fits[0]]
        return self.get(DEFAULT_BACKEND if DEFAULT_BACKEND in names or not names else names[0])


def _fits(schema: type, job: Mapping[str, Any]) -> bool:
    from tuneplex.schema.loading import validate_job

    try:
        validate_job(schema, job)
    except UsageError:
        return False
    return True


def unknown_backend_message(name: str, installed: Iterable[str]) -> str:
    installed = sorted(installed)
    msg = f"--backend: unknown backend '{name}'" + did_you_mean(name, installed)
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
