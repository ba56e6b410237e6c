"""HQQ — Half-Quadratic Quantization (Badri & Shaji, Mobius Labs, 2023), run through the maintained `hqq` package.

A peer method (issue 46): the quantization is the library's own, `hqq.core.quantize.Quantizer.quantize` with the
settings of its `BaseQuantizeConfig` for the bit width (asymmetric min/max start, groups along the input dim — its
default axis 1, the only one whose groups stay inside rows —, the zero rounded before optimisation at 4 bits, then
its proximal half-quadratic solver: a sparsity-promoting l_p loss, p = 0.7, on the weight error, the scale fixed and
the zero point updated in closed form, early-stopped). No calibration data: it sees the weights only. Our side only
hands each decoder linear's weight to the library and stores what comes back as `FloatZeroWeight` (codes, fp16
scale, fp16 zero per (row, group): the solver's zero is not an integer), so bits/weight counts b + 32/g.

Choices of this wrapper, not of the library: scales and zeros are rounded to fp16, as the library stores them on a
GPU (`compute_dtype`); where the input width is not a multiple of the group (SmolLM2's 576 at g128), the library
would let groups run across rows of the flattened weight, so the full groups and the last partial group (576 = 4 ×
128 + 64) are quantized in two calls, each group inside one row — the layout every method here uses. Per-channel
(`wN` without `g`): one group per output row (`group_size=None`, axis 1).

Measured here (SmolLM2, first 2048 test tokens, W3 g128): the library's 3-bit default leaves the zero a float from
the start (`round_zero` only at 4 bits), so 0 is not on the grid and the many near-zero weights move together; its
min/max start gives PPL 335.0 against our RTN's 101.6 at about the same weight RMSE, and the solver lowers it to
249.3. With `method.round_zero=true` the start is 102.0 and the solver 90.9. The default stays the library's; the
option is the variant.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from methods.base import QuantContext, QuantSummary, Request, UnsupportedBits
from methods.core.bits import BitSpec, check_integer_weight_bits
from methods.core.formats import FloatZeroWeight
from methods.core.params import flag, valid
from methods.core.qlinear import quantize_decoder_linears

LIBRARY = "hqq"
SUPPORTED_BITS = (1, 2, 3, 4, 8)  # hqq's Quantizer.SUPPORTED_BITS (integer widths)


@dataclass(frozen=True)
class HQQConfig:
    optimize: bool = flag(True)  # False: the library's min/max start only (its RTN), for the ablation
    # None: the library's default (rounded at 4 bits only); True/False at every width
    round_zero: bool | None = valid(None, choices=(False, True), none=True)


def supports(request: Request) -> None:
    check_integer_weight_bits(request.bits, "hqq", UnsupportedBits)
    bits = request.bits
    if bits.quantizes_weights and int(bits.w) not in SUPPORTED_BITS:
        raise UnsupportedBits(f"hqq: the library quantizes to {SUPPORTED_BITS} bits, not {bits.w}")
    if bits.group is not None and bits.group % 8:
        raise UnsupportedBits(f"hqq: the library needs a group size that is a multiple of 8, not {bits.group}")


def _library_params(bits: int, group_size: int | None, cfg: HQQConfig) -> dict:
    from hqq.core.quantize import BaseQuantizeConfig

    params = dict(BaseQuantizeConfig(nbits=bits, group_size=group_size, axis=1)["weight_quant_params"])
    params["optimize"] = cfg.optimize
    if cfg.round_zero is not None:
        params["round_zero"] = cfg.round_zero
    return params


def _quantize_block(weight: torch.Tensor, bits: int, group_size: int | None, cfg: HQQConfig):
    """The library on a [rows, cols] block whose groups lie inside rows: (codes, scales, zeros), the last two
    [rows, groups in the block]."""
    from hqq.core.quantize import Quantizer

    params = _library_params(bits, group_size, cfg)
    codes, meta = Quantizer.quantize(weight.float(), bitpack=False, device="cpu", **params)
    rows, cols = weight.shape
    groups = 1 if group_size is None else cols // group_size
    return codes.reshape(rows, cols), meta["scale"].reshape(rows, groups), meta["zero"].reshape(rows, groups)


def hqq_weight(weight: torch.Tensor, bits: int, group_size: int | None, cfg: HQQConfig) -> FloatZeroWeight:
    """One linear's weight through the library (module docstring), as `FloatZeroWeight`."""
    rows, cols = weight.shape
    group = group_size or cols
    full = (cols // group) * group
    parts = [_quantize_block(weight[:, :full], bits, group_size, cfg)]
    if full < cols:  # the last partial group, inside each row
        parts.append(_quantize_block(weight[:, full:], bits, cols - full, cfg))
    codes = torch.cat([p[0] for p in parts], dim=1).round().to(torch.uint8)
    scales = torch.cat([p[1] for p in parts], dim=1).to(torch.float16).float()
    zeros = torch.cat([p[2] for p in parts], dim=1).to(torch.float16).float()
    return FloatZeroWeight(codes, scales, zeros, bits, sym=False, group_size=group)


def quantize(model: nn.Module, cfg: HQQConfig, bits: BitSpec, ctx: QuantContext) -> QuantSummary:
    if bits.quantizes_weights:
        quantize_decoder_linears(model, lambda weight: hqq_weight(weight, int(bits.w), bits.group, cfg))
    return QuantSummary(notes={"library": f"hqq {_library_version()}"})


def _library_version() -> str:
    from importlib.metadata import version

    return version(LIBRARY)
