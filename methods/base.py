"""What every method and act/KV plug-in receives and returns, and the registry entry they share.

A weight method: a config dataclass, `supports(request)` raising `UnsupportedBits` before any model loads,
and `quantize(model, config, bits, ctx) -> QuantSummary`. An activation or KV-cache plug-in: a config
dataclass and `build(config, bits) -> ActQuantizer | KVQuantizer`; the runner composes them with any weight
method (builds them before loading, hands them to the method in `ctx`, fits them if they need calibration,
attaches them after the method ran). Attaching is idempotent, so a method that needs them inside its own loop
(a QAT trainer) may attach them itself first.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from methods.core.arch import ArchAdapter
from methods.core.bits import BitSpec
from methods.core.params import violations, with_choice_spelling


class UnsupportedBits(ValueError):
    """The method cannot run this request (bits, architecture or composition); raised before loading."""


class MissingLibrary(RuntimeError):
    """A peer method's library is not installed in this environment; the message names the one that has it."""


class ActQuantizer(Protocol):
    """Quantizes the input of decoder linears (per token, or as the plug-in defines)."""

    bits: int
    needs_calibration: bool

    def fit(self, model: nn.Module, windows: list[torch.Tensor]) -> None: ...

    def attach(self, model: nn.Module) -> None: ...


class KVQuantizer(Protocol):
    """Quantizes the KV cache; keys before or after RoPE; reports its own bytes per token."""

    bits: int
    needs_calibration: bool
    keys_pre_rope: bool

    def fit(self, model: nn.Module, windows: list[torch.Tensor]) -> None: ...

    def attach(self, model: nn.Module) -> None: ...

    def bytes_per_token(self, model: nn.Module) -> float: ...


@dataclass(frozen=True)
class Request:
    """What a run asks of a method, known before any model loads."""

    bits: BitSpec
    arch: ArchAdapter
    act: ActQuantizer | None = None  # None when activations stay 16-bit
    kv: KVQuantizer | None = None  # None when the KV cache stays 16-bit


@dataclass
class QuantContext:
    """Run-wide inputs a method may use. `calibration()` samples lazily: methods that need no data never pay."""

    seed: int
    calibration: Callable[[], list[torch.Tensor]]
    tokenizer: object = None
    act: ActQuantizer | None = None
    kv: KVQuantizer | None = None
    training: Callable[[], torch.Tensor] | None = None  # [windows, seqlen] training ids (methods that train)
    training_rows: Callable[[], list[str]] | None = None  # the training corpus's rows (prompts for generation)
    log_step: Callable[[int, dict[str, float]], None] | None = None  # per-step metrics (loss curves)
    checkpoint_dir: str | None = None  # where a training method keeps its resumable checkpoint
    cache_dir: str | None = None  # run-independent cache (e.g. teacher generations reused across runs)


@dataclass
class QuantSummary:
    """What a method reports about itself beyond the model (timings, notes); memory is measured separately."""

    notes: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)  # file name -> text, logged with the run


@dataclass(frozen=True)
class ConfigEntry:
    """A registered config dataclass; `make_config` refuses unknown parameters with the valid ones."""

    config_cls: type

    def make_config(self, label: str, params: dict[str, Any]):
        """The config dataclass from `params`; every value outside its field's declared rule (methods.core.params)
        is refused in one message naming each."""
        config = _build(self.config_cls, label, with_choice_spelling(self.config_cls, params))
        problems = violations(config)
        if problems:
            raise ValueError(f"{label}: " + "; ".join(problems))
        return config


def _build(config_cls: type, label: str, params: dict[str, Any], base=None):
    """The dataclass from a (nested) dict; a field whose default is a dataclass is built from its sub-dict, on top
    of that default (so a method's own defaults for a shared settings block hold)."""
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(params) - set(fields))
    if unknown:
        raise ValueError(f"{label} has no parameter(s) {', '.join(unknown)}; valid: {', '.join(sorted(fields))}")
    values = {}
    for name, value in params.items():
        factory = fields[name].default_factory
        default = factory() if factory is not dataclasses.MISSING else None
        if isinstance(value, dict) and dataclasses.is_dataclass(default):
            value = _build(type(default), f"{label}.{name}", value, default)
        values[name] = value
    return dataclasses.replace(base, **values) if base is not None else config_cls(**values)


@dataclass(frozen=True)
class MethodEntry(ConfigEntry):
    supports: Callable[[Request], None] = None
    quantize: Callable[..., QuantSummary] = None
    trains: bool = False  # reads `ctx.training()`: the run gets a `train:` data spec (in its run key)
    family: str = "ptq"  # "ptq" or "qat" (the paper's kind): its recipe's budget is the family's (conf/recipes.yaml)
    requires: str | None = None  # a peer method's library (import name): missing -> MissingLibrary before loading
    environment: str = "peers"  # the nox session that installs `requires` (noxfile.py)


@dataclass(frozen=True)
class PluginEntry(ConfigEntry):
    build: Callable[[Any, int], ActQuantizer | KVQuantizer] = None
