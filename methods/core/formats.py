"""Quantized weights as objects: each format owns its dequantization, its storage count and its packed layout.

Protocol (`QuantizedTensor`): `dequantize()` -> float weight [out, in]; `storage_bits()` -> every stored bit
(codes, scales, zeros, codebooks/levels, selectors, outliers, stored signs); `pack()` -> the deployed packed
object from `qkernels.packing` (its `nbytes()` is the `packed b/w` column) or None; `kernel_format(a_bits)` ->
the `qkernels.bench.KernelFormat` that executes it (with activations at `a_bits`), or None = no kernel.
`FORMATS` lists every format; the memory report and the latency evaluator refuse any other object.

Implementations:
* `QuantizedWeight` — uniform integer codes with per-(row, group) scale and zero (RTN/GPTQ/QuaRot/SignRound).
  Storage: b bits per code + fp16 scale per group + b-bit zero per group (asymmetric only).
* `LUTWeight` — non-uniform levels: b-bit codes index a table of 2^b levels, per (row, group) (RCP's LDP) or
  one shared table times a per-group fp16 scale (NF3/NF4). Storage: codes + fp16 levels (+ fp16 scales).
* `SignedLUTWeight` — codes into one shared table in [−1, 1] with separate scales for negative and positive
  levels per group (BitDistiller's NF3). Storage: codes + table + two fp16 scales per group.
* `TernaryWeight` — {−1, 0, +1} × per-(row, group) fp16 scale (ParetoQ 1.58 bit). Storage: 5 trits per byte
  (the packed layout: 1.6 bits per weight, the densest byte-aligned one) + scales.
* `BinaryWeight` — sign × per-(row, group) fp16 scale (ParetoQ 1 bit). Storage: 1 bit per weight + scales.
* `BCQWeight` — block clustered (LO-BCQ): a 4-bit index per weight into the codebook its block of L_b selects,
  × an E4M3 scale per block array × an fp32 scale per row. Storage: indices, selectors (log2 N_c bits per
  block, packed in 32-bit words), array-scale bytes, row scales and the int8-stored codebooks.
* `IncoherentWeight` — QuIP: b-bit codes of U·W·diag(d)·Vᵀ on one per-tensor grid without a zero level, with
  the seeded random orthogonal U, V and the diagonal rescaling d undone at dequantization. Storage: codes +
  one fp16 scale + fp16 d per input + the two transforms' seeds. No packed layout or kernel.
* `E8PWeight` — QuIP#: a 16-bit E8P codebook index per 8 weights of U·W·Vᵀ (randomized Hadamards), one scale;
  at 3/4 bits a second, residual index (8 or 16 bits). Storage: 2/3/4 bits per weight + one fp16 scale + the two
  transforms' seeds (+ fp16 d per input when rescaled).
  CPU reference decode only; no packed layout or kernel.
* `VQWeight` — vector quantization (RSAVQ's base; `methods/core/vq.py`): per column block of `dim` inputs, an
  index into that block's fp16 codebook (blocks may use different codebook sizes). Storage: indices at log2(K)
  bits packed per row in int32 words, the codebooks, a selector per block when there are several codebooks
  (`buffers()`). CPU reference decode only; no packed layout or kernel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Protocol, runtime_checkable

import torch

from methods.core import e8p
from methods.core.orthogonal import RandomizedHadamard, StructuredOrthogonal
from qkernels.bench import KernelFormat
from qkernels.packing import (
    PackedBCQLinear,
    PackedBinaryLinear,
    PackedLinear,
    PackedLUTLinear,
    PackedTernaryLinear,
    codes_per_word,
    packed_nbytes,
)

SCALE_BITS = 16


@runtime_checkable
class QuantizedTensor(Protocol):
    format_name: ClassVar[str]

    def dequantize(self) -> torch.Tensor: ...

    def storage_bits(self) -> int: ...

    def pack(self): ...

    def kernel_format(self, a_bits: int) -> KernelFormat | None: ...


def _pad_to_groups(x: torch.Tensor, group_size: int) -> torch.Tensor:
    pad = (-x.shape[-1]) % group_size
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.reshape(*x.shape[:-1], -1, group_size)


def _per_group(values: torch.Tensor, group_size: int, cols: int) -> torch.Tensor:
    """[rows, n_groups] -> [rows, cols] (each group's value repeated over its columns)."""
    return values.repeat_interleave(group_size, dim=1)[:, :cols]


@dataclass
class QuantizedWeight:
    """Integer codes plus per-(row, group) scales and zeros."""

    codes: torch.Tensor  # [out, in]; int8 for symmetric (signed) codes, uint8 for asymmetric
    scales: torch.Tensor  # float, [out, n_groups]
    zeros: torch.Tensor  # float (integer valued), [out, n_groups]
    bits: int
    sym: bool
    group_size: int  # = in_features for per-channel
    format_name: ClassVar[str] = "int"

    def dequantize(self) -> torch.Tensor:
        out, cols = self.codes.shape
        grouped = _pad_to_groups(self.codes.float(), self.group_size)
        w = self.scales.unsqueeze(-1) * (grouped - self.zeros.unsqueeze(-1))
        return w.reshape(out, -1)[:, :cols]

    def storage_bits(self) -> int:
        """Code bits + one fp16 scale per group + one `bits`-bit zero per group (asymmetric only)."""
        n_groups = self.scales.numel()
        zero_bits = 0 if self.sym else self.bits * n_groups
        return self.codes.numel() * self.bits + n_groups * SCALE_BITS + zero_bits

    @property
    def packable(self) -> bool:
        return self.bits in (2, 3, 4, 8)

    def pack(self) -> PackedLinear | None:
        if not self.packable:
            return None
        offset = 2 ** (self.bits - 1) if self.sym else 0
        codes = (self.codes.to(torch.int16) + offset).to(torch.uint8)
        return PackedLinear.pack(codes, self.scales, self.zeros, self.bits, self.group_size, self.sym)

    def packed_nbytes(self) -> int | None:
        rows, cols = self.codes.shape
        return packed_nbytes(rows, cols, self.scales.shape[1], self.bits, self.sym) if self.packable else None

    def kernel_format(self, a_bits: int) -> KernelFormat | None:
        """Weight-only: dequantize GEMM (2/3/4/8 bits). With ≤ 8-bit activations: integer GEMM, per-channel only."""
        if not self.packable:
            return None
        per_channel = self.group_size == self.codes.shape[1]
        group = None if per_channel else self.group_size
        if a_bits >= 16:
            return KernelFormat(self.bits, group, self.sym)
        if a_bits <= 8 and per_channel:
            return KernelFormat(self.bits, None, self.sym, a_bits)
        return None


@dataclass
class FloatZeroWeight(QuantizedWeight):
    """Integer codes with an fp16 scale and an fp16 zero point per (row, group) that need not be an integer: HQQ's
    layout (its solver moves the zero off the integer grid, so the zero is stored at the scale's precision). No
    packed layout in qkernels (its zero words are integers): the packed b/w column shows –."""

    format_name: ClassVar[str] = "int-fpzero"

    def storage_bits(self) -> int:
        """Code bits + one fp16 scale and one fp16 zero per group."""
        return self.codes.numel() * self.bits + self.scales.numel() * 2 * SCALE_BITS

    @property
    def packable(self) -> bool:
        return False


@dataclass
class LUTWeight:
    """b-bit codes into a table of 2^b levels: per (row, group) (`levels` [out, n_groups, 2^b], no scales) or
    shared (`levels` [2^b]) times a per-(row, group) `scales` [out, n_groups]."""

    codes: torch.Tensor  # uint8 [out, in], values < 2^bits
    levels: torch.Tensor  # float [out, n_groups, 2^bits] or [2^bits]
    bits: int
    group_size: int
    scales: torch.Tensor | None = None  # float [out, n_groups] when the table is shared
    format_name: ClassVar[str] = "lut"

    def __post_init__(self):
        if self.levels.shape[-1] != 2**self.bits:
            raise ValueError(f"a {self.bits}-bit LUT needs {2**self.bits} levels, got {self.levels.shape[-1]}")
        if (self.levels.dim() == 1) != (self.scales is not None):
            raise ValueError("a shared level table needs per-group scales; per-group tables take none")

    def dequantize(self) -> torch.Tensor:
        rows, cols = self.codes.shape
        codes = self.codes.long()
        if self.levels.dim() == 1:
            return self.levels.float()[codes] * _per_group(self.scales.float(), self.group_size, cols)
        groups = (torch.arange(cols) // self.group_size).expand(rows, cols)
        return self.levels.float()[torch.arange(rows)[:, None], groups, codes]

    def storage_bits(self) -> int:
        scale_count = 0 if self.scales is None else self.scales.numel()
        return self.codes.numel() * self.bits + (self.levels.numel() + scale_count) * SCALE_BITS

    def pack(self) -> PackedLUTLinear | None:
        if self.bits not in (2, 3, 4, 8):
            return None
        return PackedLUTLinear.pack(self.codes, self.levels, self.group_size, self.bits, self.scales)

    def kernel_format(self, a_bits: int) -> KernelFormat | None:
        """The LUT GEMM (qkernels.reference/triton `lut_matmul`) runs 2-bit per-group tables, weight-only; with
        per-token integer activations (≤ 8 bits) `lut_matmul_a` (RCP's W2A4)."""
        if self.bits != 2 or self.levels.dim() != 3:
            return None
        group = None if self.group_size >= self.codes.shape[1] else self.group_size  # None: one table per row
        if a_bits >= 16:
            return KernelFormat(2, group, False, kind="lut")
        if a_bits <= 8:
            return KernelFormat(2, group, False, a_bits, kind="lut")
        return None


@dataclass
class SignedLUTWeight:
    """b-bit codes into one shared table of levels in [−1, 1]; a negative level is scaled by its group's negative
    scale and a positive one by its positive scale (BitDistiller's NF3: the group's |min| and max).
    Storage: codes + the table + two fp16 scales per group. No packed layout or kernel yet."""

    codes: torch.Tensor  # uint8 [out, in], values < 2^bits
    levels: torch.Tensor  # float [2^bits], ascending
    neg_scales: torch.Tensor  # float [out, n_groups]
    pos_scales: torch.Tensor  # float [out, n_groups]
    bits: int
    group_size: int
    format_name: ClassVar[str] = "lut-signed"

    def dequantize(self) -> torch.Tensor:
        cols = self.codes.shape[1]
        level = self.levels.float()[self.codes.long()]
        neg = _per_group(self.neg_scales.float(), self.group_size, cols)
        pos = _per_group(self.pos_scales.float(), self.group_size, cols)
        return level * torch.where(level < 0, neg, pos)

    def storage_bits(self) -> int:
        scales = self.neg_scales.numel() + self.pos_scales.numel()
        return self.codes.numel() * self.bits + (self.levels.numel() + scales) * SCALE_BITS

    def pack(self) -> None:
        return None

    def kernel_format(self, a_bits: int) -> KernelFormat | None:
        return None


@dataclass
class TernaryWeight:
    """Trits {−1, 0, +1} times a per-(row, group) scale."""

    trits: torch.Tensor  # int8 [out, in]
    scales: torch.Tensor  # float [out, n_groups]
    group_size: int
    format_name: ClassVar[str] = "ternary"

    def dequantize(self) -> torch.Tensor:
        return self.trits.float() * _per_group(self.scales.float(), self.group_size, self.trits.shape[1])

    def storage_bits(self) -> int:
        rows, cols = self.trits.shape
        return 8 * rows * -(-cols // 5) + self.scales.numel() * SCALE_BITS

    def pack(self) -> PackedTernaryLinear:
        return PackedTernaryLinear.pack(self.trits, self.scales, self.group_size)

    def kernel_format(self, a_bits: int) -> KernelFormat | None:
        return None


@dataclass
class BinaryWeight:
    """Signs ±1 times a per-(row, group) scale."""

    signs: torch.Tensor  # int8 [out, in], values ±1
    scales: torch.Tensor  # float [out, n_groups]
    group_size: int
    format_name: ClassVar[str] = "binary"

    def dequantize(self) -> torch.Tensor:
        return self.signs.float() * _per_group(self.scales.float(), self.group_size, self.signs.shape[1])

    def storage_bits(self) -> int:
        return self.signs.numel() + self.scales.numel() * SCALE_BITS

    def pack(self) -> PackedBinaryLinear:
        return PackedBinaryLinear.pack(self.signs, self.scales, self.group_size)

    def kernel_format(self, a_bits: int) -> KernelFormat | None:
        return None


@dataclass
class BCQWeight:
    """LO-BCQ weights (methods/core/bcq.py): `indices` uint8 [out, padded in] (< 16; `in` zero-padded to whole
    block arrays), `selectors` uint8 [out, padded in / block_len], `array_scales` (E4M3 values) [out, padded
    in / array_len], `row_scales` fp32 [out], `codebooks` [N_c, 16] integer entries."""

    indices: torch.Tensor
    selectors: torch.Tensor
    array_scales: torch.Tensor
    row_scales: torch.Tensor
    codebooks: torch.Tensor
    block_len: int
    array_len: int
    in_features: int
    format_name: ClassVar[str] = "bcq"

    @property
    def selector_bits(self) -> int:
        """Stored selector width: the narrowest packable width (2, 3, 4, 8) holding log2 N_c bits; 0 for N_c = 1."""
        needed = (self.codebooks.shape[0] - 1).bit_length()
        return 0 if needed == 0 else next(w for w in (2, 3, 4, 8) if w >= needed)

    def dequantize(self) -> torch.Tensor:
        rows, cols = self.indices.shape
        sel = self.selectors.long().repeat_interleave(self.block_len, dim=1)
        values = self.codebooks.float()[sel, self.indices.long()].reshape(rows, -1, self.array_len)
        scale = self.array_scales.float().unsqueeze(-1) * self.row_scales.float()[:, None, None]
        return (values * scale).reshape(rows, cols)[:, : self.in_features]

    def storage_bits(self) -> int:
        rows, cols = self.indices.shape
        index_bits = rows * -(-cols // 8) * 32
        width = self.selector_bits
        selector_bits = rows * -(-self.selectors.shape[1] // codes_per_word(width)) * 32 if width else 0
        return index_bits + selector_bits + self.array_scales.numel() * 8 + rows * 32 + self.codebooks.numel() * 8

    def pack(self) -> PackedBCQLinear:
        return PackedBCQLinear.pack(
            self.indices, self.selectors, self.selector_bits, self.array_scales, self.row_scales, self.codebooks
        )

    def kernel_format(self, a_bits: int) -> KernelFormat | None:
        return None  # no BCQ GEMM kernel here: the latency column shows "no kernel"


@dataclass
class IncoherentWeight:
    """QuIP's stored weight (methods/core/incoherence.py): `codes` uint8 [out, in] < 2^bits on the grid
    level(k) = scale · (2k / (2^bits − 1) − 1) — symmetric, no zero level — in the processed basis; the weight is
    W = Uᵀ · level(codes) · V · diag(1 / col_scale)."""

    codes: torch.Tensor
    scale: float
    bits: int
    col_scale: torch.Tensor  # d [in], the diagonal rescaling (stored fp16)
    u: StructuredOrthogonal  # acts on the output dim
    v: StructuredOrthogonal  # acts on the input dim
    format_name: ClassVar[str] = "incoherent"

    def processed(self) -> torch.Tensor:
        """The quantized matrix in the processed basis: level(codes)."""
        maxq = 2**self.bits - 1
        return self.scale * (self.codes.double() * (2.0 / maxq) - 1.0)

    def dequantize(self) -> torch.Tensor:
        w = self.v.apply_transpose(self.processed())  # · V
        w = self.u.apply_transpose(w.T).T  # Uᵀ ·
        return (w / self.col_scale.double()[None, :]).float()

    def storage_bits(self) -> int:
        return (
            self.codes.numel() * self.bits
            + SCALE_BITS
            + self.col_scale.numel() * SCALE_BITS
            + self.u.storage_bits()
            + self.v.storage_bits()
        )

    def pack(self) -> None:
        return None

    def kernel_format(self, a_bits: int) -> KernelFormat | None:
        return None  # no kernel for the transforms + codes here: the latency column shows "no kernel"


@dataclass
class E8PWeight:
    """QuIP#'s stored weight: `indices` int64 [out, in / 8] into the E8P codebook (`methods.core.e8p`; at 3/4 bits
    first-stage index << residual bits | residual index), in the processed basis;
    W = diag(row_gain) · Uᵀ · (scale · rvq_decode(indices)) · V · diag(1 / col_scale) · diag(col_gain).
    The gains are the fine-tuned sign vectors' magnitudes (QuIP# §5; `methods.core.gains`): when present, S_U and
    S_V are stored as fp16 vectors, as the authors store them, in place of the transforms' seeds."""

    indices: torch.Tensor
    scale: float
    u: RandomizedHadamard  # acts on the output dim
    v: RandomizedHadamard  # acts on the input dim
    col_scale: torch.Tensor | None = None  # d [in] when the diagonal rescaling ran (stored fp16)
    bits: int = 2
    row_gain: torch.Tensor | None = None  # fp16 [out] after fine-tuning (S_U = signs · row_gain)
    col_gain: torch.Tensor | None = None  # fp16 [in] after fine-tuning (S_V = signs · col_gain)
    format_name: ClassVar[str] = "e8p"

    def processed(self) -> torch.Tensor:
        rows = self.indices.shape[0]
        return self.scale * e8p.rvq_decode(self.indices, self.bits).reshape(rows, -1)

    def dequantize(self) -> torch.Tensor:
        w = self.v.apply_transpose(self.processed())
        w = self.u.apply_transpose(w.T).T
        if self.col_scale is not None:
            w = w / self.col_scale.double()[None, :]
        if self.row_gain is not None:
            w = w * self.row_gain.double()[:, None] * self.col_gain.double()[None, :]
        return w.float()

    def storage_bits(self) -> int:
        rescale = 0 if self.col_scale is None else self.col_scale.numel() * SCALE_BITS
        if self.row_gain is not None:  # fp16 sign vectors replace the seeds
            transforms = (self.row_gain.numel() + self.col_gain.numel()) * SCALE_BITS
        else:
            transforms = self.u.storage_bits() + self.v.storage_bits()
        index_bits = e8p.INDEX_BITS + e8p.RVQ[self.bits][2]
        return self.indices.numel() * index_bits + SCALE_BITS + rescale + transforms

    def pack(self) -> None:
        return None

    def kernel_format(self, a_bits: int) -> KernelFormat | None:
        return None  # CPU reference decode only: the latency column shows "no kernel"


def _index_bits(size: int) -> int:
    return max(1, math.ceil(math.log2(size)))


@dataclass
class VQWeight:
    """Codebook indices [rows, cols / dim] (int64 in memory), codebooks (fp16 [K_i, dim]) and the codebook each
    column block uses ([cols / dim]); see the module docstring."""

    indices: torch.Tensor
    codebooks: list[torch.Tensor]
    block_codebook: torch.Tensor
    dim: int
    format_name: ClassVar[str] = "vq"

    def dequantize(self) -> torch.Tensor:
        rows, blocks = self.indices.shape
        out = torch.empty(rows, blocks, self.dim)
        for which, book in enumerate(self.codebooks):
            columns = (self.block_codebook == which).nonzero().flatten()
            out[:, columns] = book.float()[self.indices[:, columns]]
        return out.reshape(rows, blocks * self.dim)

    def bits_per_block(self) -> torch.Tensor:
        """Index bits of each column block (log2 of its codebook's size)."""
        sizes = torch.tensor([_index_bits(book.shape[0]) for book in self.codebooks])
        return sizes[self.block_codebook]

    def buffers(self) -> dict[str, torch.Tensor]:
        """What is stored, per codebook: its fp16 entries and its blocks' indices packed in int32 words per row
        (`index_bits` each, never split across words); the int32-packed selector of each column block."""
        packed = {}
        for which, book in enumerate(self.codebooks):
            columns = (self.block_codebook == which).nonzero().flatten()
            packed[f"codebook{which}"] = book.to(torch.float16)
            packed[f"indices{which}"] = _pack_words(self.indices[:, columns], _index_bits(book.shape[0]))
        if len(self.codebooks) > 1:
            packed["selectors"] = _pack_words(self.block_codebook[None, :], _index_bits(len(self.codebooks)))
        return packed

    def storage_bits(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers().values()) * 8

    def pack(self) -> None:
        return None  # no deployed layout in qkernels: the packed b/w column shows –

    def kernel_format(self, a_bits: int):
        return None  # CPU reference decode only (`dequantize`); the latency column shows "no kernel"


def _pack_words(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned values [rows, n] < 2^bits into int32 words [rows, ceil(n / per_word)], per_word = ⌊32 / bits⌋."""
    per_word = 32 // bits
    rows, n = values.shape
    padded = torch.nn.functional.pad(values.to(torch.int64), (0, (-n) % per_word)).reshape(rows, -1, per_word)
    shifts = torch.arange(per_word, dtype=torch.int64) * bits
    words = (padded << shifts).sum(dim=-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


FORMATS: dict[str, type] = {
    cls.format_name: cls
    for cls in (
        QuantizedWeight, FloatZeroWeight, LUTWeight, SignedLUTWeight, TernaryWeight, BinaryWeight, BCQWeight,
        IncoherentWeight, E8PWeight, VQWeight,
    )
}  # fmt: skip


class UnknownFormat(TypeError):
    """A quantized weight whose class is not in `FORMATS`; the message lists the known formats."""


def check_format(qweight: object) -> QuantizedTensor:
    if type(qweight) not in FORMATS.values():
        raise UnknownFormat(
            f"unknown quantized-weight format {type(qweight).__name__}; known: {', '.join(FORMATS)} "
            "(add it to methods.core.formats.FORMATS with its storage count and packer)"
        )
    return qweight
