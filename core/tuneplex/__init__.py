"""tuneplex: fine-tune large language models from one strict job file.

Importing this package is cheap: no torch, transformers or training library is loaded.
"""

from tuneplex.hookspecs import hookimpl

__version__ = "0.1.0"

__all__ = ["__version__", "hookimpl"]
