"""KV-cache vectors as a dense-and-sparse code book format (KVQuant, Hooper et al., arXiv 2401.18079, §3).

A layer's keys or values, laid out as vectors [batch, tokens, channels] (channels = kv_heads · head_dim), are
normalised to [−1, 1] and rounded to the nearest entry of a sorted table of 2^b levels:

* the range is per channel and calibrated offline (§3.1: keys, whose outliers sit in fixed channels; the
  bounds are fitted on calibration activations because a cache cannot re-scale per channel as tokens
  arrive), or per token and computed online (values; the int baseline's keys);
* the table is uniform — `uniform_levels(b)`, which is exactly asymmetric round-to-nearest with clamping —
  or non-uniform (§3.3 nuq: sensitivity-weighted k-means, `fit_levels`);
* dense-and-sparse (§3.4): values outside the bounds — the calibrated per-channel thresholds, or per-token
  quantiles computed online — are kept exact (fp16) in a CSR list and left out of the dense range;
* attention sink (the authors' later `first_few_fp16`): the first tokens of a sequence are stored in fp16;
* Q-Norm (§3.5, for 2 bits): the table is shifted and scaled so the quantized values keep the calibration
  data's mean and standard deviation.

`VectorCodec.__call__` is the fake quantizer attention reads; `encode` produces the stored format
(`DenseSparseKV`), whose `dequantize()` equals the fake quantizer's output and whose `storage_bits()` equals
the packed bytes × 8 (`pack`). Ranges, thresholds and levels are rounded to fp16 first, as stored.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from qkernels.packing import codes_per_word, pack_int

FP16_BITS = 16
INDEX_BITS = 16  # a column index within a vector (channels < 65,536)
POINTER_BITS = 32  # a CSR row pointer per stored vector


def uniform_levels(bits: int) -> torch.Tensor:
    """2^b evenly spaced levels on [−1, 1]: rounding to them is asymmetric integer RTN over [min, max]."""
    return torch.linspace(-1.0, 1.0, 2**bits)


def nearest_level(z: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index of the nearest of the sorted `levels` for every element of `z` (ties to the lower level)."""
    midpoints = (levels[1:] + levels[:-1]) / 2
    return torch.bucketize(z, midpoints.to(z.dtype))


def fit_levels(values: np.ndarray, weights: np.ndarray | None, bits: int, max_iter: int = 50, seed: int = 0):
    """Sorted 2^b levels by weighted 1-D k-means (§3.3; scikit-learn's `KMeans` with `sample_weight`, the
    authors' choice: k-means++ initialisation, `n_init="auto"`, 50 iterations). Returns (levels, inertia)."""
    from sklearn.cluster import KMeans

    kmeans = KMeans(n_clusters=2**bits, random_state=seed, n_init="auto", max_iter=max_iter)
    kmeans.fit(values.reshape(-1, 1), sample_weight=weights)
    return torch.from_numpy(np.sort(kmeans.cluster_centers_.ravel())).float(), float(kmeans.inertia_)


def q_norm(levels: torch.Tensor, z: torch.Tensor) -> tuple[float, float]:
    """Q-Norm (§3.5): scale and shift of the table so that the rounded values `levels[nearest(z)]` have the
    mean and standard deviation of `z` (the normalised calibration values)."""
    rounded = levels[nearest_level(z, levels)]
    scale = float(z.std(unbiased=False) / rounded.std(unbiased=False))
    return scale, float(z.mean() - rounded.mean() * scale)


QUANTILE_MAX_ELEMENTS = 16_000_000  # torch.quantile refuses larger inputs


def quantiles(x: torch.Tensor, probs: list[float], dim: int) -> torch.Tensor:
    """torch.quantile (linear interpolation) of a 2-D x along `dim`, for any size: row chunks along the last dim,
    numpy's identical quantile along the first (a 7B model's calibration keys are 134M values)."""
    q = torch.tensor(probs, dtype=x.dtype, device=x.device)
    if x.numel() <= QUANTILE_MAX_ELEMENTS:
        return torch.quantile(x, q, dim=dim, keepdim=dim != 0)
    if dim == 0:
        return torch.from_numpy(np.quantile(x.cpu().numpy(), probs, axis=0)).to(x.dtype).to(x.device)
    rows = max(1, QUANTILE_MAX_ELEMENTS // x.shape[-1])
    return torch.cat([torch.quantile(part, q, dim=-1, keepdim=True) for part in x.split(rows)], dim=1)


def _fp16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).float()


@dataclass
class DenseSparseKV:
    """The stored form of [tokens, channels] vectors of one layer's keys or values.

    `codes` uint8 [dense rows, channels]; `center`/`half_range` fp16, per token [dense rows] or per channel
    [channels]; `levels` fp16 [2^b] (Q-Norm folded in); outliers in CSR over the dense rows (`row_ptr` int32
    [rows + 1], `cols` int16, `vals` fp16); `sink` fp16 [n, channels], the first tokens kept whole."""

    codes: torch.Tensor
    bits: int
    levels: torch.Tensor
    center: torch.Tensor
    half_range: torch.Tensor
    per_channel: bool
    row_ptr: torch.Tensor
    cols: torch.Tensor
    vals: torch.Tensor
    sink: torch.Tensor

    def dequantize(self) -> torch.Tensor:
        z = self.levels.float()[self.codes.long()]
        if self.per_channel:
            dense = z * self.half_range.float() + self.center.float()
        else:
            dense = z * self.half_range.float()[:, None] + self.center.float()[:, None]
        rows = torch.repeat_interleave(torch.arange(dense.shape[0]), self.row_ptr.diff().long())
        dense[rows, self.cols.long()] = self.vals.float()
        return torch.cat([self.sink.float(), dense])

    def storage_bits(self) -> int:
        rows, channels = self.codes.shape
        code_bits = rows * -(-channels // codes_per_word(self.bits)) * 32
        table = self.levels.numel() + self.center.numel() + self.half_range.numel()
        outliers = self.vals.numel() * (FP16_BITS + INDEX_BITS) + self.row_ptr.numel() * POINTER_BITS
        return code_bits + table * FP16_BITS + outliers + self.sink.numel() * FP16_BITS

    def pack(self) -> dict[str, torch.Tensor]:
        """The deployed buffers: code words, fp16 tables, CSR outliers, fp16 sink rows."""
        return {
            "code_words": pack_int(self.codes, self.bits),
            "levels": self.levels.to(torch.float16),
            "center": self.center.to(torch.float16),
            "half_range": self.half_range.to(torch.float16),
            "row_ptr": self.row_ptr.to(torch.int32),
            "cols": self.cols.to(torch.int16),
            "vals": self.vals.to(torch.float16),
            "sink": self.sink.to(torch.float16),
        }


def packed_nbytes(packed: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in packed.values())


@dataclass
class VectorCodec:
    """One layer's key or value quantizer over vectors [..., tokens, channels] (see the module docstring).

    Per channel: `lower`/`upper` [channels] are the calibrated bounds (outlier thresholds when
    `outlier_fraction` > 0, else the calibration min/max: values beyond them round to the end levels).
    Per token: bounds are each token's min/max, after removing its `outlier_fraction` most extreme values
    (half at each end, by quantile) when dense-and-sparse is on."""

    bits: int
    levels: torch.Tensor
    per_channel: bool
    lower: torch.Tensor | None = None
    upper: torch.Tensor | None = None
    outlier_fraction: float = 0.0
    sink_tokens: int = 0
    norm_scale: float = 1.0
    norm_offset: float = 0.0

    def table(self) -> torch.Tensor:
        """The stored levels (Q-Norm folded in), fp16."""
        return _fp16(self.levels * self.norm_scale + self.norm_offset)

    def _parts(self, y: torch.Tensor):
        """(center, half_range, outlier mask) for vectors y [rows, channels] (float32)."""
        if self.per_channel:
            lower, upper = _fp16(self.lower), _fp16(self.upper)
            mask = (y < lower) | (y > upper) if self.outlier_fraction > 0 else torch.zeros_like(y, dtype=torch.bool)
            center, half = _fp16((upper + lower) / 2), _fp16((upper - lower) / 2)
            return center.expand_as(y), half.expand_as(y), mask, center, half
        if self.outlier_fraction > 0:
            top = 1 - self.outlier_fraction / 2
            bounds = quantiles(y, [1 - top, top], dim=-1)
            mask = (y <= bounds[0]) | (y >= bounds[1])
            trimmed = torch.where(mask, y.median(dim=-1, keepdim=True).values, y)
        else:
            mask, trimmed = torch.zeros_like(y, dtype=torch.bool), y
        lowest, highest = torch.aminmax(trimmed, dim=-1, keepdim=True)
        center, half = _fp16((highest + lowest) / 2), _fp16((highest - lowest) / 2)
        return center.expand_as(y), half.expand_as(y), mask, center.squeeze(-1), half.squeeze(-1)

    def _codes(self, y, center, half):
        safe = torch.where(half > 0, half, torch.ones_like(half))
        return nearest_level((y - center) / safe, self.table())

    def __call__(self, vectors: torch.Tensor) -> torch.Tensor:
        """Fake-quantize vectors [..., tokens, channels]: what attention reads."""
        shape, dtype = vectors.shape, vectors.dtype
        y = vectors.float().reshape(-1, shape[-2], shape[-1])
        head = y[:, : self.sink_tokens]
        body = y[:, self.sink_tokens :].reshape(-1, shape[-1])
        center, half, mask, _, _ = self._parts(body)
        deq = self.table()[self._codes(body, center, half)] * half + center
        deq = torch.where(mask, _fp16(body), deq)
        out = torch.cat([_fp16(head), deq.reshape(y.shape[0], -1, shape[-1])], dim=1)
        return out.reshape(shape).to(dtype)

    def encode(self, vectors: torch.Tensor) -> DenseSparseKV:
        """The stored format of one sequence's vectors [tokens, channels]."""
        y = vectors.float()
        sink, body = y[: self.sink_tokens], y[self.sink_tokens :]
        center, half, mask, center_stored, half_stored = self._parts(body)
        codes = self._codes(body, center, half).to(torch.uint8)
        rows, cols = mask.nonzero(as_tuple=True)
        row_ptr = torch.zeros(body.shape[0] + 1, dtype=torch.int32)
        row_ptr[1:] = torch.cumsum(torch.bincount(rows, minlength=body.shape[0]), 0)
        return DenseSparseKV(
            codes,
            self.bits,
            self.table(),
            center_stored,
            half_stored,
            self.per_channel,
            row_ptr,
            cols.to(torch.int16),
            _fp16(body[rows, cols]),
            _fp16(sink),
        )
