"""Job schemas shared by every backend: the strict base model and the common sections."""

from tuneplex.schema.base import JobSchema, StrictModel
from tuneplex.schema.common import (
    IntegrationsConfig,
    MlflowConfig,
    TensorboardConfig,
    WandbConfig,
)

__all__ = [
    "IntegrationsConfig",
    "JobSchema",
    "MlflowConfig",
    "StrictModel",
    "TensorboardConfig",
    "WandbConfig",
]
