"""RTN: round-to-nearest weights (no calibration data).

Weights: per output channel or per group of `g` inputs, symmetric or asymmetric, optional fixed clip ratio or
MSE clip search. Activations and the KV cache come from the `act=` / `kv=` plug-ins (RTN by default: QuaRot's
RTN baseline setting). Embeddings and lm_head stay 16-bit, as in every paper compared here.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from methods.base import QuantContext, QuantSummary, Request, UnsupportedBits
from methods.core.bits import BitSpec, check_integer_weight_bits
from methods.core.params import flag, valid
from methods.core.qlinear import quantize_decoder_linears
from methods.core.quantizers import WeightQuantizer


@dataclass(frozen=True)
class RTNConfig:
    w_sym: bool = flag(False)  # asymmetric min/max weights, as in the GPTQ/QuaRot RTN baselines
    w_clip_ratio: float = valid(1.0, gt=0, le=1)
    w_mse_clip: bool = flag(False)


def supports(request: Request) -> None:
    check_integer_weight_bits(request.bits, "rtn", UnsupportedBits)


def quantize(model: nn.Module, cfg: RTNConfig, bits: BitSpec, ctx: QuantContext) -> QuantSummary:
    if bits.quantizes_weights:
        quantizer = WeightQuantizer(
            int(bits.w), bits.group, sym=cfg.w_sym, clip_ratio=cfg.w_clip_ratio, mse_clip=cfg.w_mse_clip
        )
        quantize_decoder_linears(model, quantizer.quantize)
    return QuantSummary()
