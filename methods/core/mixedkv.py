"""Per-token mixed-precision KV-cache vectors: every token of a layer's keys or values is stored at its own bit
width (AKVQ-VL, Su et al., arXiv 2501.15021: attention-aware bit allocation; `methods.kv.akvq`).

One layer's keys or values over one sequence, vectors [tokens, heads, head_dim], are quantized per (token,
head, group of `group_size` consecutive head_dim entries) by dynamic round-to-nearest — the same arithmetic
as `quantizers.fake_quantize_dynamic`, so the codes are the fake quantizer's codes. Tokens fall into width
classes:

* the base class (the most tokens): codes packed per token in 32-bit words, an fp16 scale and (asymmetric)
  an fp16 zero point per group; their positions are implied (every position no other class lists);
* every other class (pivot tokens at 8 bits, text tokens, ...): the same, plus an int32 position per token;
  a 16-bit class stores fp16 values and no scales.

`storage_bits()` equals the packed buffers' bytes × 8 (`pack`). The fake quantizer computes with fp32 scales
(as `kv=rtn` does, whose bytes count fp16 scales too); `dequantize()` uses the stored fp16 scales, so the
two differ by at most the scales' fp16 rounding (|code − zero| · |s − fp16(s)| per value). Zero points are
integers ≤ 2^b − 1, exact in fp16.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from methods.core.quantizers import code_range, scale_zero
from qkernels.packing import codes_per_word, pack_int, unpack_int

FP16_BITS = 16
POSITION_BITS = 32
EXACT_BITS = 16  # a class at 16 bits keeps fp16 values


@dataclass
class TokenClass:
    """The tokens stored at one width: positions int32 [n]; codes uint8 [n, channels] (offset to unsigned for
    symmetric grids); scale/zero fp16 [n, heads · groups]; a 16-bit class keeps `exact` fp16 [n, channels]."""

    bits: int
    positions: torch.Tensor
    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    exact: torch.Tensor


@dataclass
class MixedPrecisionKV:
    """One sequence's keys or values of one layer (module docstring). `classes[0]` is the base class."""

    tokens: int
    heads: int
    head_dim: int
    group_size: int
    sym: bool
    classes: list[TokenClass]

    def _class_bits(self, cls: TokenClass, base: bool) -> int:
        n, channels = cls.positions.numel(), self.heads * self.head_dim
        positions = 0 if base else n * POSITION_BITS
        if cls.bits >= EXACT_BITS:
            return positions + n * channels * FP16_BITS
        words = n * -(-channels // codes_per_word(cls.bits)) * 32
        per_group = FP16_BITS if self.sym else 2 * FP16_BITS
        return positions + words + n * self.heads * (self.head_dim // self.group_size) * per_group

    def storage_bits(self) -> int:
        return sum(self._class_bits(cls, i == 0) for i, cls in enumerate(self.classes))

    def pack(self) -> dict[str, torch.Tensor]:
        """The deployed buffers per class: code words, fp16 scales (and zeros), int32 positions (not for the
        base class), fp16 rows for a 16-bit class."""
        packed = {}
        for i, cls in enumerate(self.classes):
            name = f"b{cls.bits}"
            if i:
                packed[f"{name}.positions"] = cls.positions.to(torch.int32)
            if cls.bits >= EXACT_BITS:
                packed[f"{name}.values"] = cls.exact.to(torch.float16)
                continue
            packed[f"{name}.code_words"] = pack_int(cls.codes, cls.bits)
            packed[f"{name}.scale"] = cls.scale.to(torch.float16)
            if not self.sym:
                packed[f"{name}.zero"] = cls.zero.to(torch.float16)
        return packed

    def dequantize(self) -> torch.Tensor:
        """Vectors [tokens, heads, head_dim] from the stored buffers (fp16 scales)."""
        out = torch.empty(self.tokens, self.heads, self.head_dim)
        groups = self.head_dim // self.group_size
        for cls in self.classes:
            rows = cls.positions.long()
            if cls.bits >= EXACT_BITS:
                out[rows] = cls.exact.float().reshape(-1, self.heads, self.head_dim)
                continue
            codes = unpack_int(pack_int(cls.codes, cls.bits), cls.bits, cls.codes.shape[1]).float()
            lo, _ = code_range(cls.bits, self.sym)
            codes = codes.reshape(-1, self.heads, groups, self.group_size) + lo
            scale = cls.scale.float().reshape(-1, self.heads, groups, 1)
            zero = cls.zero.float().reshape(-1, self.heads, groups, 1)
            out[rows] = (scale * (codes - zero)).reshape(-1, self.heads, self.head_dim)
        return out


def encode_mixed(
    vectors: torch.Tensor, token_bits: torch.Tensor, base_bits: int, group_size: int, sym: bool
) -> MixedPrecisionKV:
    """Store vectors [tokens, heads, head_dim] with token i at `token_bits[i]` bits (module docstring)."""
    tokens, heads, head_dim = vectors.shape
    if head_dim % group_size:
        raise ValueError(f"group_size={group_size} must divide head_dim={head_dim}")
    grouped = vectors.float().reshape(tokens, heads, head_dim // group_size, group_size)
    widths = [base_bits] + sorted({int(b) for b in token_bits.unique()} - {base_bits})
    classes = []
    for bits in widths:
        rows = (token_bits == bits).nonzero().flatten()
        x = grouped[rows]
        if bits >= EXACT_BITS:
            empty = torch.empty(0)
            exact = x.reshape(rows.numel(), -1).to(torch.float16)
            classes.append(TokenClass(bits, rows.to(torch.int32), empty, empty, empty, exact))
            continue
        scale, zero = scale_zero(x, bits, sym)
        lo, hi = code_range(bits, sym)
        codes = torch.clamp(torch.round(x / scale) + zero, lo, hi) - lo
        classes.append(
            TokenClass(
                bits,
                rows.to(torch.int32),
                codes.reshape(rows.numel(), -1).to(torch.uint8),
                scale.reshape(rows.numel(), -1).to(torch.float16),
                zero.reshape(rows.numel(), -1).to(torch.float16),
                torch.empty(0),
            )
        )
    return MixedPrecisionKV(tokens, heads, head_dim, group_size, sym, classes)
