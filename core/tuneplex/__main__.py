"""`python -m tuneplex` is the `tuneplex` command."""

from tuneplex.cli import run

run()
