"""Packed weight formats: the bytes that are deployed, so the memory column counts real storage.

* int2 / int4 / int8: 16 / 8 / 4 codes per little-endian int32 word along the input dim;
* int3: 10 codes per int32 word (30 bits used; 3.2 bits per code);
* ternary {−1, 0, +1}: 5 trits per byte in base 3 (3⁵ = 243 ≤ 256; 1.6 bits per code);
* group scales (fp16) and, for asymmetric grids only, zero points (packed at the code width, like GPTQ's
  qzeros; a symmetric grid's zero is the constant 2^(b−1) and is not stored);
* binary ±1: 32 signs per int32 word (bit set = +1);
* non-uniform (LUT): b-bit codes in words as above, plus fp16 levels — a per-(row, group) table of 2^b (RCP's
  LDP; the 2-bit case has a kernel) or one shared table with fp16 per-group scales (NF3/NF4);
* ternary and binary weights carry fp16 per-(row, group) scales.
Codes are unsigned: a symmetric grid's signed codes are offset by 2^(b−1) with zero point 2^(b−1).
Every format round-trips exactly (tests/test_kernels.py, tests/test_formats.py). This module knows tensors
only; the format objects of `methods.core.formats` call it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
    def pack(
        cls, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int, sym: bool
    ) -> PackedLinear:
        """`codes`: unsigned [out, in] (a symmetric grid's codes already offset by 2^(b−1))."""
        if sym:
            zero_words = torch.zeros(codes.shape[0], 0, dtype=torch.int32)
        else:
            zero_words = pack_int(zeros.round().clamp(0, 2**bits - 1).to(torch.uint8), bits)
        return cls(pack_int(codes, bits), scales.to(torch.float16), zero_words, bits, group_size, codes.shape[1], sym)

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


def pack_bits(signs: torch.Tensor) -> torch.Tensor:
    """Pack ±1 values [rows, cols] as 32 bits per int32 word (bit set = +1)."""
    if signs.numel() and not bool(((signs == 1) | (signs == -1)).all()):
        raise ValueError("binary packing needs values in {-1, 1}")
    rows, cols = signs.shape
    bits = torch.nn.functional.pad((signs > 0).to(torch.int64), (0, (-cols) % 32)).reshape(rows, -1, 32)
    words = (bits << torch.arange(32, dtype=torch.int64)).sum(dim=-1)
    return (words - (words >= 2**31).to(torch.int64) * 2**32).to(torch.int32)


def unpack_bits(words: torch.Tensor, cols: int) -> torch.Tensor:
    w = words.to(torch.int64) & 0xFFFFFFFF
    bits = (w.unsqueeze(-1) >> torch.arange(32, dtype=torch.int64)) & 1
    return (bits.reshape(words.shape[0], -1)[:, :cols] * 2 - 1).to(torch.int8)


@dataclass
class PackedLUTLinear:
    """Non-uniform weights: b-bit codes index fp16 levels — a per-(row, group) table [out, n_groups, 2^b]
    (RCP's LDP format; the kernels run the 2-bit case) or a shared table [2^b] times fp16 per-group scales."""

    words: torch.Tensor  # int32 [out, n_words], b-bit codes
    levels: torch.Tensor  # fp16 [out, n_groups, 2^b] or [2^b]
    group_size: int
    in_features: int
    bits: int = 2
    scales: torch.Tensor | None = None  # fp16 [out, n_groups] with a shared table

    @classmethod
    def pack(
        cls,
        codes: torch.Tensor,
        levels: torch.Tensor,
        group_size: int,
        bits: int = 2,
        scales: torch.Tensor | None = None,
    ) -> PackedLUTLinear:
        half = None if scales is None else scales.to(torch.float16)
        return cls(pack_int(codes, bits), levels.to(torch.float16), group_size, codes.shape[1], bits, half)

    def codes(self) -> torch.Tensor:
        return unpack_int(self.words, self.bits, self.in_features)

    def nbytes(self) -> int:
        scale_bytes = 0 if self.scales is None else self.scales.numel() * 2
        return self.words.numel() * 4 + self.levels.numel() * 2 + scale_bytes


@dataclass
class PackedTernaryLinear:
    """Ternary weights: 5 trits per byte (`pack_ternary`) and fp16 per-(row, group) scales."""

    trit_bytes: torch.Tensor  # uint8 [out, ceil(in / 5)]
    scales: torch.Tensor  # fp16 [out, n_groups]
    group_size: int
    in_features: int

    @classmethod
    def pack(cls, trits: torch.Tensor, scales: torch.Tensor, group_size: int) -> PackedTernaryLinear:
        return cls(pack_ternary(trits), scales.to(torch.float16), group_size, trits.shape[1])

    def trits(self) -> torch.Tensor:
        return unpack_ternary(self.trit_bytes, self.in_features)

    def nbytes(self) -> int:
        return self.trit_bytes.numel() + self.scales.numel() * 2


@dataclass
class PackedBinaryLinear:
    """Binary weights: 32 signs per int32 word (`pack_bits`) and fp16 per-(row, group) scales."""

    words: torch.Tensor  # int32 [out, ceil(in / 32)]
    scales: torch.Tensor  # fp16 [out, n_groups]
    group_size: int
    in_features: int

    @classmethod
    def pack(cls, signs: torch.Tensor, scales: torch.Tensor, group_size: int) -> PackedBinaryLinear:
        return cls(pack_bits(signs), scales.to(torch.float16), group_size, signs.shape[1])

    def signs(self) -> torch.Tensor:
        return unpack_bits(self.words, self.in_features)

    def nbytes(self) -> int:
        return self.words.numel() * 4 + self.scales.numel() * 2


@dataclass
class PackedBCQLinear:
    """Block clustered weights (LO-BCQ): 4-bit entry indices, a codebook selector per block (log2 N_c bits),
    one E4M3 byte per block array, an fp32 scale per row and the int8-stored codebooks [N_c, 16]."""

    index_words: torch.Tensor  # int32 [out, in / 8]
    selector_words: torch.Tensor | None  # int32 [out, n_words] of selector_bits codes; None when N_c = 1
    array_scales: torch.Tensor  # uint8 [out, in / L_A] (E4M3 bit patterns)
    row_scales: torch.Tensor  # fp32 [out]
    codebooks: torch.Tensor  # int8 [N_c, 16]

    @classmethod
    def pack(cls, indices, selectors, selector_bits, array_scales, row_scales, codebooks) -> PackedBCQLinear:
        selector_words = pack_int(selectors, selector_bits) if selector_bits else None
        scale_bytes = array_scales.to(torch.float8_e4m3fn).view(torch.uint8)
        return cls(pack_int(indices, 4), selector_words, scale_bytes, row_scales.float(), codebooks.to(torch.int8))

    def nbytes(self) -> int:
        selectors = 0 if self.selector_words is None else self.selector_words.numel() * 4
        return (
            self.index_words.numel() * 4
            + selectors
            + self.array_scales.numel()
            + self.row_scales.numel() * 4
            + self.codebooks.numel()
        )
