"""GPTQ (Frantar et al., ICLR 2023): layer-wise second-order weight quantization with calibration data.

Weights go through the shared solver (`methods.core.gptq`), block by block; activations and the KV cache,
when the bit string asks for them, come from the `act=` / `kv=` plug-ins (GPTQ itself is weight-only).
Defaults are the paper's — damp 0.01, block 128, asymmetric min/max grids, 128 calibration windows of 2048
tokens (their C4 is replaced by `calib.dataset`, WikiText-2 by default) — except two the maintained toolkits
(the authors' later code, AutoGPTQ, llm-compressor) changed: act-order with static groups, and the solve in fp32
(`methods.core.gptq`). `act_order=false` is the paper's first setting. Symmetric grids (`w_sym=true`) follow
the reference code's convention, `w_sym_grid=full_range` (scale max|w| / (2^(b-1) - 1/2), zero at 2^(b-1));
`absmax` is QuaRot's (and this harness's before the option existed).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from methods.base import QuantContext, QuantSummary, Request, UnsupportedBits
from methods.core.bits import BitSpec, check_integer_weight_bits
from methods.core.gptq import GPTQSettings, quantize_model_gptq
from methods.core.params import Valid, added_later, flag
from methods.core.quantizers import SYM_GRIDS, WeightQuantizer


@dataclass(frozen=True)
class GPTQConfig(GPTQSettings):
    w_sym: bool = flag(False)
    w_mse_clip: bool = flag(False)
    w_sym_grid: str = added_later("full_range", legacy="absmax", valid=Valid(choices=SYM_GRIDS))


def supports(request: Request) -> None:
    check_integer_weight_bits(request.bits, "gptq", UnsupportedBits)


def quantize(model: nn.Module, cfg: GPTQConfig, bits: BitSpec, ctx: QuantContext) -> QuantSummary:
    summary = QuantSummary()
    if bits.quantizes_weights:
        quantizer = WeightQuantizer(
            int(bits.w), bits.group, sym=cfg.w_sym, mse_clip=cfg.w_mse_clip, sym_grid=cfg.w_sym_grid
        )
        summary.metrics.update(quantize_model_gptq(model, ctx.calibration(), quantizer, cfg))
    return summary
