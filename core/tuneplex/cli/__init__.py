"""The `tuneplex` command line: `app` (typer), `main(argv)` -> exit code, `run()` (the console
script). One module per command group; `common` holds what they share."""

from tuneplex.cli.app import app, main, run

__all__ = ["app", "main", "run"]
