"""tuneplex backend `unsloth`: memory-constrained single-GPU LoRA and full fine-tuning."""

from tuneplex import hookimpl

__version__ = "0.1.0"


@hookimpl
def register_backends(register):
    from tuneplex_unsloth.backend import UnslothBackend

    register(UnslothBackend())
