"""Uniform quantizers: the grids every method shares.

Conventions (those of GPTQ / QuaRot reference code, and of auto-round):
* asymmetric, `b` bits: range [min(x, 0), max(x, 0)] scaled by `clip_ratio`,
  scale = (max - min) / (2^b - 1), zero = round(-min / scale), q = clamp(round(x / scale) + zero, 0, 2^b - 1),
  x̂ = scale · (q - zero).
* symmetric, `b` bits, two conventions (`sym_grid`), both q = clamp(round(x / scale), -2^(b-1), 2^(b-1) - 1),
  x̂ = scale · q (codes are stored offset by 2^(b-1) so they are unsigned):
  - "absmax" (QuaRot's, this harness's default): scale = clip_ratio · max|x| / (2^(b-1) - 1): ±max|x| land on
    ±(2^(b-1) - 1), so the lowest code -2^(b-1) is never used;
  - "full_range" (GPTQ's reference code and llm-compressor: a min/max grid over [-max|x|, max|x|] with the zero
    point at 2^(b-1)): scale = clip_ratio · max|x| / (2^(b-1) - 1/2), every code used, +max|x| clipped by half a step.
The range always contains 0, so zero-padding a trailing partial group changes nothing: that is how
per-group statistics handle widths that are not a multiple of the group size (e.g. 576 with g128).
An all-zero group gets scale 1 (every code maps back to 0).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from methods.core.formats import QuantizedWeight
from methods.core.formats import _pad_to_groups as zero_padded_groups


def _pad_to_groups(x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, int]:
    """Reshape the last dim into groups of `group_size`, zero-padding the trailing partial group; also the width."""
    return zero_padded_groups(x, group_size), x.shape[-1]


SYM_GRIDS = ("absmax", "full_range")


def scale_zero(
    x: torch.Tensor, bits: int, sym: bool, clip_ratio: float | torch.Tensor = 1.0, sym_grid: str = "absmax"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point for a reduction over the last dim (keepdim). Zero is 0 for symmetric grids."""
    return _scale_zero_of_range(
        x.amin(dim=-1, keepdim=True), x.amax(dim=-1, keepdim=True), bits, sym, clip_ratio, sym_grid
    )


def _scale_zero_of_range(
    lowest: torch.Tensor, highest: torch.Tensor, bits: int, sym: bool, clip_ratio, sym_grid: str
) -> tuple[torch.Tensor, torch.Tensor]:
    xmin = lowest.clamp(max=0) * clip_ratio
    xmax = highest.clamp(min=0) * clip_ratio
    if sym:
        if sym_grid not in SYM_GRIDS:
            raise ValueError(f"sym_grid must be one of {', '.join(SYM_GRIDS)}, got {sym_grid!r}")
        absmax = torch.maximum(xmin.abs(), xmax)
        scale = absmax / (2 ** (bits - 1) - (0.5 if sym_grid == "full_range" else 1))
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        return scale, torch.zeros_like(scale)
    scale = (xmax - xmin) / (2**bits - 1)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    zero = torch.round(-xmin / scale)
    return scale, zero


def code_range(bits: int, sym: bool) -> tuple[int, int]:
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if sym else (0, 2**bits - 1)


def quantize_codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, sym: bool) -> torch.Tensor:
    lo, hi = code_range(bits, sym)
    return torch.clamp(torch.round(x / scale) + zero, lo, hi)


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return scale * (codes - zero)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, sym: bool) -> torch.Tensor:
    """Round-to-nearest onto a given grid and back (Eq. 1 of most papers: x̂ = s·(clamp(⌊x/s⌉+z) − z))."""
    return dequantize_codes(quantize_codes(x, scale, zero, bits, sym), scale, zero)


_COMPILED_ROWS: dict[str, object] = {"enabled": False, "fn": None}


def compile_quantizers(enabled: bool = True) -> None:
    """Run the per-token activation/KV fake quantizer through `torch.compile`: one fused pass instead of five
    over the activations (on this CPU ~4x faster at 2048 x 1536). Inductor keeps the true division and the
    round-half-to-even of the eager code, so values are identical (tests compare bit for bit); the harness turns
    it on for evaluation (`eval.compile_quantizers`), training and tests run eager."""
    _COMPILED_ROWS["enabled"] = enabled
    if enabled and _COMPILED_ROWS["fn"] is None:
        _COMPILED_ROWS["fn"] = torch.compile(_fake_quantize_rows)


def compiling() -> bool:
    """Whether evaluation asked for compiled quantizers (`compile_quantizers`); other online quantizers
    (LO-BCQ's block encoder) follow the same switch."""
    return bool(_COMPILED_ROWS["enabled"])


def _rows_compiled_or_eager(x: torch.Tensor, bits: int, sym: bool, clip_ratio: float) -> torch.Tensor:
    """The compiled quantizer; if compiling fails (no C++ compiler on the machine...), say so once and go on
    eager — the values are the same either way."""
    try:
        return _COMPILED_ROWS["fn"](x, bits, sym, clip_ratio)
    except Exception as error:  # torch.compile raises backend-specific errors
        message = f"torch.compile of the act/KV quantizer failed ({type(error).__name__}); running eager"
        warnings.warn(message, stacklevel=2)
        _COMPILED_ROWS["enabled"] = False
        return _fake_quantize_rows(x, bits, sym, clip_ratio)


def fake_quantize_dynamic(
    x: torch.Tensor, bits: int, sym: bool, clip_ratio: float = 1.0, group_size: int | None = None
) -> torch.Tensor:
    """Per-row (per-token) dynamic quantization over the last dim, optionally in groups of `group_size`.

    Used for activations (per token) and the KV cache (per token and head, group = head_dim or smaller).
    """
    if bits >= 16:
        return x
    dtype = x.dtype
    xf = x.float()
    if group_size is None or group_size >= x.shape[-1]:
        rows = _rows_compiled_or_eager if _COMPILED_ROWS["enabled"] and not xf.requires_grad else _fake_quantize_rows
        return rows(xf, bits, sym, clip_ratio).to(dtype)
    grouped, cols = _pad_to_groups(xf, group_size)
    scale, zero = scale_zero(grouped, bits, sym, clip_ratio)
    out = fake_quantize(grouped, scale, zero, bits, sym).reshape(*x.shape[:-1], -1)[..., :cols]
    return out.to(dtype)


def _fake_quantize_rows(x: torch.Tensor, bits: int, sym: bool, clip_ratio: float) -> torch.Tensor:
    """`fake_quantize(x, *scale_zero(x, bits, sym, clip_ratio), bits, sym)` — the same operations on the same
    values, so the same result — in fewer passes over x: one min/max reduction, then one division into a fresh
    tensor rounded, clamped and rescaled in place (the activation quantizer runs at every linear's input)."""
    lowest, highest = torch.aminmax(x, dim=-1, keepdim=True)
    scale, zero = _scale_zero_of_range(lowest, highest, bits, sym, clip_ratio, "absmax")
    lo, hi = code_range(bits, sym)
    out = torch.div(x, scale).round_()
    if sym:
        return out.clamp_(lo, hi).mul_(scale)
    return out.add_(zero).clamp_(lo, hi).sub_(zero).mul_(scale)


@dataclass(frozen=True)
class DynamicQuantizer:
    """Dynamic round-to-nearest quantization over the last dim, statistics taken at run time: per token for
    activations (QuaRot §4: symmetric, clip 0.9), per token and head for the KV cache (asymmetric, group =
    head_dim unless `group_size` is smaller). One class for both; `bits` ≥ 16 is the identity."""

    bits: int
    sym: bool = True
    clip_ratio: float = 1.0
    group_size: int | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quantize_dynamic(x, self.bits, self.sym, self.clip_ratio, self.group_size)


@dataclass(frozen=True)
class WeightQuantizer:
    """Round-to-nearest weight quantizer: per output channel (`group_size=None`) or per group of inputs.

    `mse_clip` searches the clip ratio per (row, group) on a grid in [`mse_min_ratio`, 1] minimising
    ‖w − ŵ‖^p (p = 2.4, the GPTQ/QuaRot reference setting); otherwise `clip_ratio` is fixed.
    """

    bits: int
    group_size: int | None = None
    sym: bool = False
    clip_ratio: float = 1.0
    mse_clip: bool = False
    mse_grid: int = 100
    mse_min_ratio: float = 0.2
    mse_norm: float = 2.4
    sym_grid: str = "absmax"  # symmetric grids only: "absmax" or "full_range" (module docstring)

    def group_params(self, w_grouped: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale/zero for weights already shaped [..., group]; picks the MSE-best clip if asked."""
        if not self.mse_clip:
            return scale_zero(w_grouped, self.bits, self.sym, self.clip_ratio, self.sym_grid)
        best_err = torch.full(w_grouped.shape[:-1] + (1,), math.inf, device=w_grouped.device)
        best_scale, best_zero = scale_zero(w_grouped, self.bits, self.sym, 1.0, self.sym_grid)
        steps = int(round((1 - self.mse_min_ratio) * self.mse_grid))
        for i in range(steps + 1):
            ratio = 1.0 - i / self.mse_grid
            scale, zero = scale_zero(w_grouped, self.bits, self.sym, ratio, self.sym_grid)
            err = (fake_quantize(w_grouped, scale, zero, self.bits, self.sym) - w_grouped).abs()
            err = err.pow(self.mse_norm).sum(dim=-1, keepdim=True)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, scale, best_scale)
            best_zero = torch.where(better, zero, best_zero)
        return best_scale, best_zero

    def effective_group(self, in_features: int) -> int:
        return self.group_size if self.group_size else in_features

    def straight_through(self, weight: torch.Tensor) -> torch.Tensor:
        """The fake-quantized weight in the forward, the identity in the backward (the gradient passes every
        entry, clipped ones too, as SpinQuant's in-loop weight quantizer does); scales from the detached weight."""
        group = self.effective_group(weight.shape[1])
        grouped, cols = _pad_to_groups(weight.detach(), group)
        if not self.mse_clip and (not self.sym or self.sym_grid == "absmax"):
            fake = _fake_quantize_rows(grouped, self.bits, self.sym, self.clip_ratio)  # the same values, fewer passes
        else:
            fake = fake_quantize(grouped, *self.group_params(grouped), self.bits, self.sym)
        fake = fake.reshape(weight.shape[0], -1)[:, :cols]
        return weight + (fake.to(weight.dtype) - weight).detach()

    def quantize(self, weight: torch.Tensor) -> QuantizedWeight:
        w = weight.detach().float()
        group = self.effective_group(w.shape[1])
        grouped, cols = _pad_to_groups(w, group)
        scale, zero = self.group_params(grouped)
        codes = quantize_codes(grouped, scale, zero, self.bits, self.sym).reshape(w.shape[0], -1)[:, :cols]
        return QuantizedWeight(
            codes=codes.to(torch.int8 if self.sym else torch.uint8),
            scales=scale.squeeze(-1),
            zeros=zero.squeeze(-1),
            bits=self.bits,
            sym=self.sym,
            group_size=group,
        )


def ste_round(x: torch.Tensor) -> torch.Tensor:
    """Straight-through rounding: forward round, backward identity (for QAT methods)."""
    return x + (torch.round(x) - x).detach()


def fake_quantize_ste(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, sym: bool) -> torch.Tensor:
    """Fake quantization with a straight-through estimator; gradients reach x and (LSQ-style) scale."""
    lo, hi = code_range(bits, sym)
    q = torch.clamp(ste_round(x / scale) + zero, lo, hi)
    return scale * (q - zero)
