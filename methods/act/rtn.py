"""Dynamic round-to-nearest activation quantization at the input of every decoder linear (QuaRot §4: per
token, symmetric; QuaRot clips at 0.9 — `conf/act_recipe/quarot-rtn.yaml` — the RTN/GPTQ baselines at 1.0).
The input quantized is the one the weight multiplies: after the linear's online transform, if it has one."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from methods.core.params import flag, valid
from methods.core.qlinear import attach_act_quantizers
from methods.core.quantizers import DynamicQuantizer


@dataclass(frozen=True)
class RTNActConfig:
    sym: bool = flag(True)
    clip_ratio: float = valid(1.0, gt=0, le=1)
    group_size: int | None = valid(None, ge=1, none=True)  # None = one group per token


@dataclass
class RTNActQuantizer:
    bits: int
    config: RTNActConfig
    needs_calibration: bool = False

    def quantizer(self) -> DynamicQuantizer:
        return DynamicQuantizer(self.bits, self.config.sym, self.config.clip_ratio, self.config.group_size)

    def fit(self, model: nn.Module, windows) -> None:
        """Dynamic: statistics are taken per token at run time; nothing to fit."""

    def attach(self, model: nn.Module) -> None:
        quantizer = self.quantizer()
        attach_act_quantizers(model, lambda name: quantizer)


def build(config: RTNActConfig, bits: int) -> RTNActQuantizer:
    return RTNActQuantizer(bits, config)
