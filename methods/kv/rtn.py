"""Dynamic round-to-nearest KV-cache quantization: per token and head, group-wise (group = head_dim unless
smaller), asymmetric by default (QuaRot §4; QuaRot clips at 0.95 — `conf/kv_recipe/quarot-rtn.yaml`). Keys are
quantized after RoPE (what the cache stores; QuaRot) or, with `keys_pre_rope`, on the last key value before
RoPE (KVQuant's placement; the arch adapter says where that is)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from methods.core.attention import attention_states, uniform_kv_bytes_per_token
from methods.core.params import flag, valid
from methods.core.quantizers import DynamicQuantizer


@dataclass(frozen=True)
class RTNKVConfig:
    sym: bool = flag(False)
    clip_ratio: float = valid(1.0, gt=0, le=1)
    group_size: int | None = valid(None, ge=1, none=True)  # None = one group per head (head_dim)
    keys_pre_rope: bool = flag(False)


@dataclass
class RTNKVQuantizer:
    bits: int
    config: RTNKVConfig
    needs_calibration: bool = False

    @property
    def keys_pre_rope(self) -> bool:
        return self.config.keys_pre_rope

    def quantizer(self) -> DynamicQuantizer:
        return DynamicQuantizer(self.bits, self.config.sym, self.config.clip_ratio, self.config.group_size)

    def fit(self, model: nn.Module, windows) -> None:
        """Dynamic: statistics are taken per token at run time; nothing to fit."""

    def attach(self, model: nn.Module) -> None:
        quantizer = self.quantizer()
        for state in attention_states(model):
            state.set_kv(quantizer, quantizer, self.keys_pre_rope)

    def bytes_per_token(self, model: nn.Module) -> float:
        return uniform_kv_bytes_per_token(model, self.bits, self.config.sym, self.config.group_size)


def build(config: RTNKVConfig, bits: int) -> RTNKVQuantizer:
    return RTNKVQuantizer(bits, config)
