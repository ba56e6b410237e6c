"""The method registry: one line per method. A method is a config dataclass, a `supports(bits)` check that
raises `UnsupportedBits` (before any model loads) and `quantize(model, config, bits, ctx) -> QuantSummary`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from methods import gptq, quarot, rtn, signround


@dataclass(frozen=True)
class MethodEntry:
    config_cls: type
    supports: Callable
    quantize: Callable

    def make_config(self, name: str, params: dict[str, Any]):
        fields = {f.name for f in dataclasses.fields(self.config_cls)}
        unknown = sorted(set(params) - fields)
        if unknown:
            raise ValueError(
                f"method {name!r} has no parameter(s) {', '.join(unknown)}; valid: {', '.join(sorted(fields))}"
            )
        return self.config_cls(**params)


METHODS: dict[str, MethodEntry] = {
    "rtn": MethodEntry(rtn.RTNConfig, rtn.supports, rtn.quantize),
    "gptq": MethodEntry(gptq.GPTQConfig, gptq.supports, gptq.quantize),
    "quarot": MethodEntry(quarot.QuaRotConfig, quarot.supports, quarot.quantize),
    "signround": MethodEntry(signround.SignRoundConfig, signround.supports, signround.quantize),
}
