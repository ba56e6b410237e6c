"""RTN: round-to-nearest baseline for weights, activations and the KV cache (no calibration data).

Weights: per output channel or per group of `g` inputs, symmetric or asymmetric, optional fixed clip ratio
or MSE clip search. Activations: per-token dynamic quantization at the input of every decoder linear
(QuaRot's RTN baseline setting). KV cache: per token and head, group-wise asymmetric, after RoPE.
Embeddings and lm_head stay 16-bit, as in every paper compared here.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from harness.spec import BitSpec
from methods.base import QuantContext, QuantSummary, UnsupportedBits
from methods.core.arch import decoder_linears
from methods.core.attention import attention_states
from methods.core.qlinear import QLinear, set_quantized_weight
from methods.core.quantizers import DynamicQuantizer, WeightQuantizer

INTEGER_WEIGHT_BITS = (2, 3, 4, 5, 6, 8, 16)


@dataclass(frozen=True)
class ActKVSettings:
    """Round-to-nearest activation and KV-cache quantizer settings, shared by every method that uses them
    (weight-only methods leave them idle unless the bit string asks for A/KV bits)."""

    a_sym: bool = True
    a_clip_ratio: float = 1.0
    kv_sym: bool = False
    kv_clip_ratio: float = 1.0
    kv_group_size: int | None = None


@dataclass(frozen=True)
class RTNConfig(ActKVSettings):
    w_sym: bool = False
    w_clip_ratio: float = 1.0
    w_mse_clip: bool = False


def check_integer_bits(bits: BitSpec, method: str) -> None:
    """Uniform-grid methods run integer weight widths 2..8 (or 16); 1 and 1.58 bit need ParetoQ's grids."""
    if bits.w not in INTEGER_WEIGHT_BITS:
        raise UnsupportedBits(
            f"{method} does not support {bits}: weight bits must be one of "
            f"{', '.join(str(b) for b in INTEGER_WEIGHT_BITS)} (1 and 1.58 bit need a ternary/binary method)"
        )


def attach_act_and_kv(model: nn.Module, bits: BitSpec, settings: ActKVSettings) -> None:
    """Activation quantizers on every decoder linear's input and KV-cache quantizers, as `bits` asks."""
    if bits.quantizes_activations:
        act = DynamicQuantizer(bits.a, sym=settings.a_sym, clip_ratio=settings.a_clip_ratio)
        for _, parent, attr, module in decoder_linears(model):
            if not isinstance(module, QLinear):
                module = QLinear.wrap(module)
                setattr(parent, attr, module)
            module.act_quant = act
    if bits.quantizes_kv:
        kvq = DynamicQuantizer(
            bits.kv, sym=settings.kv_sym, clip_ratio=settings.kv_clip_ratio, group_size=settings.kv_group_size
        )
        for state in attention_states(model):
            state.set_kv(kvq, kvq, keys_pre_rope=False)


def quantize_weights_rtn(model: nn.Module, quantizer: WeightQuantizer) -> None:
    for _, parent, attr, linear in decoder_linears(model):
        set_quantized_weight(parent, attr, linear, quantizer.quantize(linear.weight.data))


def supports(bits: BitSpec) -> None:
    check_integer_bits(bits, "rtn")


def quantize(model: nn.Module, cfg: RTNConfig, bits: BitSpec, ctx: QuantContext) -> QuantSummary:
    if bits.quantizes_weights:
        quantizer = WeightQuantizer(
            int(bits.w), bits.group, sym=cfg.w_sym, clip_ratio=cfg.w_clip_ratio, mse_clip=cfg.w_mse_clip
        )
        quantize_weights_rtn(model, quantizer)
    attach_act_and_kv(model, bits, cfg)
    return QuantSummary()
