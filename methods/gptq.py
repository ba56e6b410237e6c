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
from methods.rtn import ActKVSettings, attach_act_and_kv, check_integer_bits


@dataclass(frozen=True)
class GPTQConfig(ActKVSettings):
    w_sym: bool = False
    w_mse_clip: bool = False
    damp: float = 0.01
    act_order: bool = False
    block_size: int = 128
    calib_batch_size: int = 4


def supports(bits: BitSpec) -> None:
    check_integer_bits(bits, "gptq")


def weight_quantizer(cfg: GPTQConfig, bits: BitSpec) -> WeightQuantizer:
    return WeightQuantizer(int(bits.w), bits.group, sym=cfg.w_sym, mse_clip=cfg.w_mse_clip)


def quantize_weights(model: nn.Module, cfg: GPTQConfig, bits: BitSpec, ctx: QuantContext) -> dict[str, float]:
    """Every decoder linear by the GPTQ solver (paper Alg. 1) on `ctx`'s calibration windows; returns metrics."""
    quantizer = weight_quantizer(cfg, bits)
    return quantize_model_gptq(
        model, ctx.calibration(), quantizer, cfg.damp, cfg.act_order, cfg.block_size, cfg.calib_batch_size
    )


def quantize(model: nn.Module, cfg: GPTQConfig, bits: BitSpec, ctx: QuantContext) -> QuantSummary:
    summary = QuantSummary()
    if bits.quantizes_weights:
        summary.metrics.update(quantize_weights(model, cfg, bits, ctx))
    attach_act_and_kv(model, bits, cfg)
    return summary
