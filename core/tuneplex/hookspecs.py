"""The one hook through which plugins add backends.

A plugin is a module named by an entry point in the `tuneplex` group::

    [project.entry-points.tuneplex]
    mybackend = "my_package"

and implements::

    from tuneplex import hookimpl

    @hookimpl
    def register_backends(register):
        register(MyBackend())

Importing the plugin module must stay cheap (no torch): it runs for every CLI command.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from tuneplex.backend import Backend

PROJECT = "tuneplex"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_backends(register: Callable[[Backend], None]) -> None:
    """Call `register(backend)` once for each backend this plugin provides."""
