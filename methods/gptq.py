"""GPTQ (Frantar et al., ICLR 2023): layer-wise second-order weight quantization with calibration data.

Weights go through the shared solver (`methods.core.gptq`), block by block; activations and the KV cache,
when the bit string asks for them, get the same RTN quantizers as the `rtn` method (GPTQ itself is
weight-only). Defaults are the paper's: damp 0.01, block 128, no act-order, asymmetric min/max grids,
128 calibration windows of 2048 tokens (their C4 is replaced by `calib.dataset`, WikiText-2 by default).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from harness.spec import BitSpec
from methods.base import QuantContext, QuantSummary
from methods.core.gptq import quantize_model_gptq
from methods.core.quantizers import WeightQuantizer
from methods.rtn import attach_act_and_kv, check_integer_bits


@dataclass(frozen=True)
class GPTQConfig:
    w_sym: bool = False
    w_mse_clip: bool = False
    damp: float = 0.01
    act_order: bool = False
    block_size: int = 128
    calib_batch_size: int = 4
    a_sym: bool = True
    a_clip_ratio: float = 1.0
    kv_sym: bool = False
    kv_clip_ratio: float = 1.0
    kv_group_size: int | None = None


def supports(bits: BitSpec) -> None:
    check_integer_bits(bits, "gptq")


def quantize(model: nn.Module, cfg: GPTQConfig, bits: BitSpec, ctx: QuantContext) -> QuantSummary:
    summary = QuantSummary()
    if bits.quantizes_weights:
        quantizer = WeightQuantizer(int(bits.w), bits.group, sym=cfg.w_sym, mse_clip=cfg.w_mse_clip)
        summary.metrics.update(
            quantize_model_gptq(
                model, ctx.calibration(), quantizer, cfg.damp, cfg.act_order, cfg.block_size, cfg.calib_batch_size
            )
        )
    attach_act_and_kv(model, bits, cfg.a_sym, cfg.a_clip_ratio, cfg.kv_sym, cfg.kv_clip_ratio, cfg.kv_group_size)
    return summary
