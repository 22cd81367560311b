"""Where training memory goes: measured (:mod:`lora_course.memory_measure`) and estimated
(:mod:`lora_course.memory_estimate`). This module gathers both under one name."""

from .memory_estimate import (  # noqa: F401
    GiB,
    METHODS,
    MiB,
    OPTIMIZERS,
    MemoryBreakdown,
    activation_bytes,
    estimate_training_memory,
    model_on_meta,
)
from .memory_measure import LiveBytes, PeakMemory, storage_bytes, track_peak_memory  # noqa: F401

__all__ = ["METHODS", "OPTIMIZERS", "LiveBytes", "MemoryBreakdown", "PeakMemory", "activation_bytes",
           "estimate_training_memory", "model_on_meta", "storage_bytes", "track_peak_memory"]
