"""AWQ — Activation-aware Weight Quantization (Lin et al., MLSys 2024), run through llm-compressor's `AWQModifier`.

A peer method (issue 46). The paper: weight channels that meet large activations matter most, so before rounding
each input channel is scaled up by s (and the layer that feeds it — an RMSNorm, or v_proj for o_proj, up_proj for
down_proj — scaled down by 1/s, an exact equivalence in FP), with s = s_X^α from the mean activation magnitude per
channel and α picked from a grid of 20 on [0, 1] by the output error of the quantized block on calibration data;
then asymmetric min/max INT grids per group. The library does the same search per mapping (its architecture tables
give the Llama and Gemma-3 mappings) and, by default, the AutoAWQ variant s = s_X^α / s_W^(1-α) ("duo scaling",
`method.duo_scaling=true`; the paper's s_X^α alone is `false`, `both` searches both halves). The weights are then
rounded by its `QuantizationModifier` with min/max observers. The paper also searches a clipping ratio per group
after scaling; llm-compressor 0.14 does not, and neither does this wrapper.

Our side (methods/core/llmc.py): the harness's calibration windows exactly, the library's codes stored as
`QuantizedWeight` (int codes, a scale and a b-bit zero per (row, group): b + (16 + b)/g bits/weight), our evaluator.
The library quantizes whole groups only: a model whose input widths are not multiples of the group (SmolLM2-135M's
576 at g128) gets a one-line refusal naming a group that fits (g64 there). Runs in `nox -s llmc`.
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
class AWQConfig:
    duo_scaling: str = valid("true", choices=("true", "false", "both"))  # library default; "false" = the paper's s
    n_grid: int = valid(20, ge=2)  # the paper's grid of α
    w_sym: bool = flag(False)  # the paper's asymmetric grids


def supports(request: Request) -> None:
    check_integer_weight_bits(request.bits, "awq", UnsupportedBits)
    if request.bits.quantizes_weights and int(request.bits.w) not in (2, 3, 4, 8):
        raise UnsupportedBits(f"awq: integer weights of 2, 3, 4 or 8 bits, not {request.bits.w}")


def _duo_scaling(value: str) -> bool | str:
    return {"true": True, "false": False}.get(value, value)


def quantize(model: nn.Module, cfg: AWQConfig, bits: BitSpec, ctx: QuantContext) -> QuantSummary:
    if not bits.quantizes_weights:
        return QuantSummary(notes={"library": f"llmcompressor {llmc.library_version()}"})
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    try:
        llmc.check_group_divides(model, bits.group)
    except ValueError as err:
        raise UnsupportedBits(f"awq: {err}") from None
    scheme = llmc.quantization_scheme(int(bits.w), bits.group, cfg.w_sym)
    recipe = [
        AWQModifier(duo_scaling=_duo_scaling(cfg.duo_scaling), n_grid=cfg.n_grid),
        QuantizationModifier(config_groups={"weights": scheme}, ignore=["lm_head"]),
    ]
    llmc.run_oneshot(model, ctx.calibration(), ctx.tokenizer, recipe)
    replaced = llmc.weights_from_library(model)
    return QuantSummary(
        metrics={"llmc_linears": float(replaced)}, notes={"library": f"llmcompressor {llmc.library_version()}"}
    )
