"""SmoothQuant (Xiao et al., ICML 2023), run through llm-compressor's `SmoothQuantModifier`.

A peer method (issue 46). The paper: activation outliers sit in a few input channels, so each channel j is divided
by s_j = max|X_j|^α / max|W_j|^(1−α) (α = 0.5 its default, "migration strength") and the weights' column j
multiplied by s_j — folded into the norm that feeds q/k/v and gate/up, exact in FP — before both are quantized to
8 bits. The library computes max|X_j| on the calibration windows with the Llama mappings (input_layernorm → q/k/v,
post_attention_layernorm → gate/up). Weights: `method.weights=gptq` (default; llm-compressor's own W8A8 recipe,
GPTQ after smoothing, and the issue's "SmoothQuant + GPTQ" at W4A8) or `rtn` (the paper's round-to-nearest);
symmetric per output channel (or per group, from the bit string). Activations: the harness's `act=` plug-in
(act=rtn: dynamic per-token symmetric INT, the library's W8A8 activation scheme and the paper's O1 setting); the KV
cache from `kv=`. Codes stored as `QuantizedWeight` (methods/core/llmc.py). Runs in `nox -s llmc`.

Refused: weight-only bit strings (the method exists to quantize activations), and Gemma-3. llm-compressor 0.14
smooths Gemma-3 with the Llama mappings, but Gemma-3's post_attention_layernorm normalizes the attention output
before the residual add (the MLP reads pre_feedforward_layernorm) and its norms multiply by (1 + w), so folding
1/s into those weights is not an equivalence: measured, smoothing alone (no quantization, α = 0.8) moves tiny
Gemma-3's logits by 124% (relative L2), tiny Llama's by 2e-7.
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
class SmoothQuantConfig:
    alpha: float = valid(0.5, ge=0, le=1)  # the paper's migration strength (the library's smoothing_strength)
    weights: str = valid("gptq", choices=("gptq", "rtn"))
    w_sym: bool = flag(True)
    damp: float = valid(0.01, gt=0)  # weights=gptq: our GPTQ's and the library's default
    act_order: bool = flag(True)  # weights=gptq: static groups, as our GPTQ


def supports(request: Request) -> None:
    bits = request.bits
    check_integer_weight_bits(bits, "smoothquant", UnsupportedBits)
    if not bits.quantizes_weights or int(bits.w) not in (2, 3, 4, 8):
        raise UnsupportedBits(f"smoothquant: integer weights of 2, 3, 4 or 8 bits, not {bits.w}")
    if bits.a >= 16:
        raise UnsupportedBits("smoothquant: it moves activation outliers into weights; quantize activations (a8)")
    if request.arch.family == "gemma3":
        raise UnsupportedBits(
            "smoothquant: llm-compressor 0.14 smooths Gemma-3 with Llama's norm mappings, which changes the FP "
            "model there (methods/smoothquant.py); use a Llama-family model"
        )


def quantize(model: nn.Module, cfg: SmoothQuantConfig, bits: BitSpec, ctx: QuantContext) -> QuantSummary:
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier

    try:
        llmc.check_group_divides(model, bits.group)
    except ValueError as err:
        raise UnsupportedBits(f"smoothquant: {err}") from None
    scheme = {"weights": llmc.quantization_scheme(int(bits.w), bits.group, cfg.w_sym)}
    if cfg.weights == "gptq":
        actorder = "static" if cfg.act_order else None
        weights = GPTQModifier(config_groups=scheme, ignore=["lm_head"], dampening_frac=cfg.damp, actorder=actorder)
    else:
        weights = QuantizationModifier(config_groups=scheme, ignore=["lm_head"])
    recipe = [SmoothQuantModifier(smoothing_strength=cfg.alpha), weights]
    llmc.run_oneshot(model, ctx.calibration(), ctx.tokenizer, recipe)
    return QuantSummary(
        metrics={"llmc_linears": float(llmc.weights_from_library(model))},
        notes={"library": f"llmcompressor {llmc.library_version()}"},
    )
