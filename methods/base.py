"""What every method receives and returns."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass
class QuantContext:
    """Run-wide inputs a method may use. `calibration()` samples lazily: methods that need no data never pay."""

    seed: int
    calibration: Callable[[], list[torch.Tensor]]
    tokenizer: object = None


@dataclass
class QuantSummary:
    """What a method reports about itself beyond the model (timings, notes); memory is measured separately."""

    notes: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


class UnsupportedBits(ValueError):
    """The method cannot run this bit setting; raised before any model is loaded."""
