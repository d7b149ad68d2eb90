"""Memory estimates before anything loads: a model's shape from its config.json, and the
peak bytes per GPU of a training job (`tuneplex plan`). Standard library only."""

from tuneplex.memory.estimate import MemoryChange, MemoryEstimate, MemoryJob, estimate
from tuneplex.memory.shape import ModelShape, read_model_shape

__all__ = [
    "MemoryChange",
    "MemoryEstimate",
    "MemoryJob",
    "ModelShape",
    "estimate",
    "read_model_shape",
]
