"""GPTQ through llm-compressor's `GPTQModifier` — the maintained GPTQ in the loop beside our own (`method=gptq`).

A peer method (issue 46): the same algorithm (Frantar et al., ICLR 2023) from vLLM's library, at our GPTQ's exact
settings so the two rows differ only in whose code ran: the bits and group of the bit string, asymmetric min/max
grids unless `method.w_sym=true` (the library's symmetric scale is max|w| / ((2^b − 1) / 2), our `full_range`
grid), act-order with static groups (`method.act_order`, the library's `actorder="static"`; false: no reordering),
damp 1% of the mean Hessian diagonal (`method.damp`, the library's `dampening_frac`), blocks of 128 columns, and the
harness's calibration windows exactly. Like ours, the library quantizes one decoder layer at a time on the outputs
of the already-quantized layers before it (its sequential pipeline), each linear's Hessian from that layer's pass.

Stored as `QuantizedWeight` from the library's scales, zeros and codes (methods/core/llmc.py), so bits/weight and
the packed columns are counted as for ours. The library quantizes whole groups only (see methods/awq.py). Runs in
`nox -s llmc`.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from methods.base import QuantContext, QuantSummary, Request, UnsupportedBits
from methods.core import llmc
from methods.core.bits import BitSpec, check_integer_weight_bits
from methods.core.params import flag, valid

LIBRARY = llmc.LIBRARY


@dataclass(frozen=True)
class GPTQLLMCConfig:
    w_sym: bool = flag(False)
    act_order: bool = flag(True)  # our GPTQ's default: act-order with static groups
    damp: float = valid(0.01, gt=0)
    block_size: int = valid(128, ge=1)


def supports(request: Request) -> None:
    check_integer_weight_bits(request.bits, "gptq_llmc", UnsupportedBits)
    if request.bits.quantizes_weights and int(request.bits.w) not in (2, 3, 4, 8):
        raise UnsupportedBits(f"gptq_llmc: integer weights of 2, 3, 4 or 8 bits, not {request.bits.w}")


def quantize(model: nn.Module, cfg: GPTQLLMCConfig, bits: BitSpec, ctx: QuantContext) -> QuantSummary:
    notes = {"library": f"llmcompressor {llmc.library_version()}"}
    if not bits.quantizes_weights:
        return QuantSummary(notes=notes)
    from llmcompressor.modifiers.quantization import GPTQModifier

    try:
        llmc.check_group_divides(model, bits.group)
    except ValueError as err:
        raise UnsupportedBits(f"gptq_llmc: {err}") from None
    scheme = llmc.quantization_scheme(int(bits.w), bits.group, cfg.w_sym)
    recipe = [
        GPTQModifier(
            config_groups={"weights": scheme},
            ignore=["lm_head"],
            block_size=cfg.block_size,
            dampening_frac=cfg.damp,
            actorder="static" if cfg.act_order else None,
        )
    ]
    llmc.run_oneshot(model, ctx.calibration(), ctx.tokenizer, recipe)
    return QuantSummary(metrics={"llmc_linears": float(llmc.weights_from_library(model))}, notes=notes)
