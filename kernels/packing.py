"""Packed weight formats: the bytes that are deployed, so the memory column counts real storage.

* int2 / int4 / int8: 16 / 8 / 4 codes per little-endian int32 word along the input dim;
* int3: 10 codes per int32 word (30 bits used; 3.2 bits per code);
* ternary {−1, 0, +1}: 5 trits per byte in base 3 (3⁵ = 243 ≤ 256; 1.6 bits per code);
* group scales (fp16) and, for asymmetric grids only, zero points (packed at the code width, like GPTQ's
  qzeros; a symmetric grid's zero is the constant 2^(b−1) and is not stored);
* non-uniform 2-bit (RCP/LDP style): 2-bit codes index a per-(row, group) table of 4 fp16 levels.
Codes are unsigned: a symmetric grid's signed codes are offset by 2^(b−1) with zero point 2^(b−1).
Every format round-trips exactly (tests/test_packing.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from methods.core.quantizers import QuantizedWeight


def codes_per_word(bits: int) -> int:
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"int packing supports 2, 3, 4 or 8 bits, got {bits}")
    return 10 if bits == 3 else 32 // bits


def packed_nbytes(rows: int, cols: int, n_groups: int, bits: int, sym: bool) -> int:
    """Bytes of a `PackedLinear` without building it: code words, fp16 scales, zero words (asymmetric)."""
    per = codes_per_word(bits)
    zero_words = 0 if sym else rows * -(-n_groups // per)
    return 4 * rows * -(-cols // per) + 2 * rows * n_groups + 4 * zero_words


def pack_int(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes [rows, cols] (values < 2^bits) into int32 words [rows, ceil(cols / per_word)]."""
    if codes.dim() != 2:
        raise ValueError(f"pack_int expects a 2-D code matrix, got shape {tuple(codes.shape)}")
    per = codes_per_word(bits)
    c = codes.to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= 2**bits):
        raise ValueError(f"codes out of range for {bits} bits: [{int(c.min())}, {int(c.max())}]")
    rows, cols = c.shape
    pad = (-cols) % per
    c = torch.nn.functional.pad(c, (0, pad)).reshape(rows, -1, per)
    shifts = torch.arange(per, dtype=torch.int64) * bits
    words = (c << shifts).sum(dim=-1)
    return (words - (words >= 2**31).to(torch.int64) * 2**32).to(torch.int32)  # reinterpret as signed int32


def unpack_int(words: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of `pack_int`: int32 words [rows, n_words] -> uint8 codes [rows, cols]."""
    per = codes_per_word(bits)
    w = words.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(per, dtype=torch.int64) * bits
    codes = (w.unsqueeze(-1) >> shifts) & (2**bits - 1)
    return codes.reshape(words.shape[0], -1)[:, :cols].to(torch.uint8)


def pack_ternary(trits: torch.Tensor) -> torch.Tensor:
    """Pack values in {−1, 0, 1} [rows, cols] as 5 base-3 digits per byte -> uint8 [rows, ceil(cols / 5)]."""
    t = trits.to(torch.int64) + 1
    if t.numel() and (int(t.min()) < 0 or int(t.max()) > 2):
        raise ValueError("ternary packing needs values in {-1, 0, 1}")
    rows, cols = t.shape
    t = torch.nn.functional.pad(t, (0, (-cols) % 5)).reshape(rows, -1, 5)
    powers = 3 ** torch.arange(5, dtype=torch.int64)
    return (t * powers).sum(-1).to(torch.uint8)


def unpack_ternary(packed: torch.Tensor, cols: int) -> torch.Tensor:
    p = packed.to(torch.int64).unsqueeze(-1)
    powers = 3 ** torch.arange(5, dtype=torch.int64)
    trits = (p // powers) % 3 - 1
    return trits.reshape(packed.shape[0], -1)[:, :cols].to(torch.int8)


@dataclass
class PackedLinear:
    """A group-quantized weight as deployed: packed codes, fp16 scales, packed zero points (asymmetric only)."""

    words: torch.Tensor  # int32 [out, n_words]
    scales: torch.Tensor  # fp16 [out, n_groups]
    zero_words: torch.Tensor  # int32 [out, ceil(n_groups / per_word)]; [out, 0] for a symmetric grid
    bits: int
    group_size: int
    in_features: int
    sym: bool = False

    @classmethod
    def from_quantized(cls, q: QuantizedWeight) -> PackedLinear:
        offset = 2 ** (q.bits - 1) if q.sym else 0
        codes = (q.codes.to(torch.int16) + offset).to(torch.uint8)
        if q.sym:
            zero_words = torch.zeros(codes.shape[0], 0, dtype=torch.int32)
        else:
            zero_words = pack_int(q.zeros.round().clamp(0, 2**q.bits - 1).to(torch.uint8), q.bits)
        return cls(
            pack_int(codes, q.bits),
            q.scales.to(torch.float16),
            zero_words,
            q.bits,
            q.group_size,
            q.codes.shape[1],
            q.sym,
        )

    @property
    def out_features(self) -> int:
        return self.words.shape[0]

    def codes(self) -> torch.Tensor:
        return unpack_int(self.words, self.bits, self.in_features)

    def zeros(self) -> torch.Tensor:
        """Unsigned zero point per (row, group); the constant 2^(b−1) for a symmetric grid."""
        if self.sym:
            return torch.full(self.scales.shape, 2 ** (self.bits - 1), dtype=torch.uint8)
        return unpack_int(self.zero_words, self.bits, self.scales.shape[1])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.words, self.scales, self.zero_words))


@dataclass
class PackedLUTLinear:
    """Non-uniform 2-bit weights: codes index a per-(row, group) table of 4 fp16 levels (RCP's LDP format)."""

    words: torch.Tensor  # int32 [out, n_words], 2-bit codes
    levels: torch.Tensor  # fp16 [out, n_groups, 4]
    group_size: int
    in_features: int

    @classmethod
    def pack(cls, codes: torch.Tensor, levels: torch.Tensor, group_size: int) -> PackedLUTLinear:
        return cls(pack_int(codes, 2), levels.to(torch.float16), group_size, codes.shape[1])

    def codes(self) -> torch.Tensor:
        return unpack_int(self.words, 2, self.in_features)

    def nbytes(self) -> int:
        return self.words.numel() * 4 + self.levels.numel() * 2
