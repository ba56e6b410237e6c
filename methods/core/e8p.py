"""QuIP#'s E8P codebook (Tseng et al., ICML 2024, arXiv 2402.04396, §4.2): 65,536 vectors of dimension 8, a
16-bit index per 8 weights (2 bits per weight), built here from its definition.

* Absolute patterns: the 227 vectors of positive half-integers with squared norm ≤ 10 (the absolute values of
  D̂8 = (D8 + ½) ∩ {‖x‖² ≤ 10}: entries in {½, 3/2, 5/2}), plus 29 of the norm-12 vectors with five 3/2 and three ½
  entries (the authors' choice, listed below by the positions of their ½ entries): 256 patterns.
* Each pattern a is signed into the coset D8 + ½ (even coordinate sum: the last coordinate is negated when the
  sum of a is odd), then sign-flipped by any even number of coordinates (2^7 = 128 ways) and shifted by ±¼ in
  every coordinate: 256 · 128 · 2 = 65,536 distinct vectors, all in E8 + ¼.
* Index (this harness's layout; the authors pack differently for their kernel): bits 15–8 the pattern, bits 6–0
  flip coordinates 0–6 (coordinate 7 flips too when their count is odd, keeping the flip count even), bit 7 the
  shift (0: +¼, 1: −¼).

3 and 4 bits (the authors' residual codebooks, E8P12RVQ3B / E8P12RVQ4B): E8P on x scaled to RMS 0.98 (3 bit) or
1.03 (4 bit), then the residual times 2.04 rounded to E8-1bit — the 256 points of E8 with squared norm ≤ 2 (the
origin, 112 integer and 128 half-integer roots) plus 15 of norm 4 (2e_i, and −2e_i for i < 7) — or times 3.45
rounded to E8P again; the value is first + second / residual scale. Indices: 16 + 8 or 16 + 16 bits per 8 weights.

Nearest-vector search (`nearest`) works on the absolute-value grid, exact: for each shift δ and pattern a, the
best signing of a for y = x − δ takes the signs of y, except when the parity of y's negative count differs from
the pattern's — then the cheapest coordinate j (least 4·|y_j|·a_j) takes the other sign. 2 · 256 candidates per
vector instead of 65,536; `nearest_bruteforce` is the test oracle.
"""

from __future__ import annotations

import functools
import itertools

import torch

DIM = 8
INDEX_BITS = 16
OPT_SCALE = 1.03  # the authors' E8P scale: weights are divided by RMS / 1.03 before rounding
# bits per weight -> (first-stage scale, residual scale, residual index bits): the authors' values
RVQ = {2: (1.03, None, 0), 3: (0.98, 2.04, 8), 4: (1.03, 3.45, 16)}

# The 29 norm-12 patterns (five 3/2 and three 1/2): positions of their 1/2 entries, from the authors' table.
_NORM12_HALF_POSITIONS = (
    (1, 2, 3), (0, 2, 3), (0, 1, 3), (0, 1, 2), (3, 6, 7), (3, 5, 7), (3, 4, 7), (3, 5, 6), (3, 4, 6), (3, 4, 5),
    (2, 6, 7), (2, 5, 7), (2, 4, 7), (2, 5, 6), (2, 4, 6), (2, 4, 5), (1, 6, 7), (1, 5, 7), (1, 4, 7), (1, 5, 6),
    (1, 4, 6), (0, 4, 5), (0, 6, 7), (0, 5, 7), (0, 4, 7), (0, 5, 6), (0, 4, 6), (0, 1, 4), (2, 3, 7),
)  # fmt: skip


@functools.cache
def abs_patterns() -> torch.Tensor:
    """[256, 8] float64: the 227 half-integer patterns of squared norm ≤ 10, then the 29 norm-12 ones."""
    small = [p for p in itertools.product((0.5, 1.5, 2.5), repeat=DIM) if sum(v * v for v in p) <= 10]
    norm12 = [[0.5 if i in halves else 1.5 for i in range(DIM)] for halves in _NORM12_HALF_POSITIONS]
    patterns = torch.tensor(sorted(small) + norm12, dtype=torch.float64)
    assert patterns.shape == (256, DIM)
    return patterns


@functools.cache
def _pattern_parity() -> torch.Tensor:
    """[256] bool: whether the pattern's coordinate sum is odd (its signed base has its last coordinate < 0)."""
    return (abs_patterns().sum(dim=1).round().long() % 2) == 1


def decode(index: torch.Tensor) -> torch.Tensor:
    """Indices (any integer shape, values < 2^16) -> vectors [..., 8] float64."""
    index = index.long()
    pattern = abs_patterns()[index >> 8]
    low = index & 127
    flips = torch.stack([(low >> j) & 1 for j in range(DIM - 1)], dim=-1)
    last = flips.sum(dim=-1) % 2
    last = last ^ _pattern_parity()[index >> 8].long()  # the base's own sign on coordinate 7
    signs = 1 - 2 * torch.cat([flips, last.unsqueeze(-1)], dim=-1).double()
    shift = torch.where((index >> 7) & 1 == 1, -0.25, 0.25).double()
    return pattern * signs + shift.unsqueeze(-1)


@functools.cache
def codebook() -> torch.Tensor:
    """All 65,536 vectors [65536, 8], row i = decode(i)."""
    return decode(torch.arange(2**INDEX_BITS))


def _encode(pattern: torch.Tensor, negative: torch.Tensor, minus: torch.Tensor) -> torch.Tensor:
    """Index of the vector with absolute pattern `pattern`, negative coordinates `negative` [.., 8] and shift −¼
    where `minus`."""
    bits = sum(negative[..., j].long() << j for j in range(DIM - 1))
    return (pattern.long() << 8) | (minus.long() << 7) | bits


def _cheapest_flip(ay: torch.Tensor, patterns: torch.Tensor) -> torch.Tensor:
    """For every vector and pattern, min_j 4·|y_j|·a_j — the cost of giving one coordinate the sign against y's;
    [N, 256] (a running minimum over the 8 coordinates: ~10x faster on CPU than reducing a [N, 256, 8] product
    over its last dim)."""
    cost = ay[:, :1] * patterns[None, :, 0]
    for j in range(1, DIM):
        torch.minimum(cost, ay[:, j : j + 1] * patterns[None, :, j], out=cost)
    return 4 * cost


def nearest(x: torch.Tensor, chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest codebook vector to each row of x [N, 8] (Euclidean): (vectors [N, 8] float64, indices [N])."""
    patterns = abs_patterns()
    parity = _pattern_parity()
    norms = patterns.square().sum(dim=1)
    values, indices = [], []
    for start in range(0, x.shape[0], chunk):
        xs = x[start : start + chunk].double()
        best_err = torch.full((xs.shape[0],), float("inf"), dtype=torch.float64)
        best_idx = torch.zeros(xs.shape[0], dtype=torch.long)
        for minus in (False, True):
            y = xs - (-0.25 if minus else 0.25)
            ay, neg = y.abs(), y < 0
            odd = (neg.sum(dim=1) % 2) == 1
            err = ay.square().sum(dim=1, keepdim=True) - 2 * ay @ patterns.T + norms[None, :]  # [n, 256]
            mismatch = odd[:, None] != parity[None, :]
            err = err + torch.where(mismatch, _cheapest_flip(ay, patterns), 0.0)
            err_min, pattern = err.min(dim=1)
            negative = neg.clone()  # coordinates 0-6 are stored; 7 follows from the parity (`decode`)
            rows = torch.nonzero(odd != parity[pattern]).squeeze(1)
            flip = (ay[rows] * patterns[pattern[rows]]).argmin(dim=1)
            negative[rows, flip] = ~negative[rows, flip]
            idx = _encode(pattern, negative, torch.full_like(pattern, int(minus), dtype=torch.bool))
            better = err_min < best_err
            best_err = torch.where(better, err_min, best_err)
            best_idx = torch.where(better, idx, best_idx)
        indices.append(best_idx)
        values.append(decode(best_idx))
    return torch.cat(values), torch.cat(indices)


def nearest_bruteforce(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The oracle: argmin over all 65,536 vectors."""
    book = codebook()
    dist = x.double().square().sum(1, keepdim=True) - 2 * x.double() @ book.T + book.square().sum(1)[None, :]
    idx = dist.argmin(dim=1)
    return book[idx], idx


@functools.cache
def e81b_codebook() -> torch.Tensor:
    """[256, 8] float64: E8 points of squared norm ≤ 2, then the 15 norm-4 points 2e_0…2e_7, −2e_0…−2e_6."""
    integer = [p for p in itertools.product((-1, 0, 1), repeat=DIM) if sum(v * v for v in p) <= 2 and sum(p) % 2 == 0]
    half = [p for p in itertools.product((-0.5, 0.5), repeat=DIM) if round(sum(p)) % 2 == 0]
    norm4 = [[2.0 * (i == j) for i in range(DIM)] for j in range(DIM)]
    norm4 += [[-2.0 * (i == j) for i in range(DIM)] for j in range(DIM - 1)]
    book = torch.tensor(sorted(integer) + sorted(half) + norm4, dtype=torch.float64)
    assert book.shape == (256, DIM)
    return book


def _nearest_in(book: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dist = x.double().square().sum(1, keepdim=True) - 2 * x.double() @ book.T + book.square().sum(1)[None, :]
    idx = dist.argmin(dim=1)
    return book[idx], idx


def rvq_nearest(bits: int):
    """The vector quantizer for `bits` per weight ([N, 8] in first-stage units -> (values, indices)): E8P alone
    at 2 bits; E8P + the residual codebook at 3 and 4 (module docstring)."""
    if bits not in RVQ:
        raise ValueError(f"E8P codebooks exist for {', '.join(map(str, RVQ))} bits, got {bits}")
    _, resid_scale, resid_bits = RVQ[bits]
    if resid_scale is None:
        return nearest

    def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        first, first_idx = nearest(x)
        residual = (x.double() - first) * resid_scale
        second, second_idx = nearest(residual) if bits == 4 else _nearest_in(e81b_codebook(), residual)
        return first + second / resid_scale, (first_idx << resid_bits) | second_idx

    return quantize


def rvq_decode(index: torch.Tensor, bits: int) -> torch.Tensor:
    """Indices of `rvq_nearest(bits)` -> vectors [..., 8] in first-stage units."""
    _, resid_scale, resid_bits = RVQ[bits]
    index = index.long()
    if resid_scale is None:
        return decode(index)
    first = decode(index >> resid_bits)
    low = index & ((1 << resid_bits) - 1)
    second = decode(low) if bits == 4 else e81b_codebook()[low]
    return first + second / resid_scale
