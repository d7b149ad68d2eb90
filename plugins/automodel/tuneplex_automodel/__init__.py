"""tuneplex backend `automodel`: PyTorch-native (FSDP2, DTensor) distributed fine-tuning."""

from tuneplex import hookimpl

__version__ = "0.1.0"


@hookimpl
def register_backends(register):
    from tuneplex_automodel.backend import AutomodelBackend

    register(AutomodelBackend())
