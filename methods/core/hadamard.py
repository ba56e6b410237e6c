"""Orthonormal Hadamard transforms of any order a Llama-family model needs, built in code.

n = m · 2^k is split into a power-of-two part (Sylvester, applied by the O(n log n) fast Walsh–Hadamard
butterfly) and a small factor m with a dense Hadamard matrix from Paley's constructions:
* Paley I, q prime, q ≡ 3 (mod 4): order q + 1 (e.g. 12 from q = 11, 20 from 19, 44 from 43);
* Paley II, q prime, q ≡ 1 (mod 4): order 2(q + 1) (e.g. 28 from 13, 36 from 17).
H_n = H_m ⊗ H_{2^k}: SmolLM2's 576 = 36 · 16 (Paley II) and 1536 = 12 · 128 (Paley I) are exact Hadamard
transforms. Where no Paley factor exists (with m ≤ 256: Llama-2-7B's 11008 = 43 · 256 has none with prime q), m is
the odd part and H_m is replaced by a seeded random orthogonal matrix (QR of a Gaussian): the transform
stays exactly orthogonal but is no longer a ±1/√n matrix, so its incoherence guarantee is weaker. Every
matrix is checked (H Hᵀ = n I) when built.
"""

from __future__ import annotations

import functools

import torch

MAX_DENSE_FACTOR = 256  # keeps the dense part of an online transform cheap (O(n·m) per token)


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, int(q**0.5) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = χ(j − i), χ the quadratic character of GF(q), q prime."""
    residues = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0] + [1 if a in residues else -1 for a in range(1, q)], dtype=torch.float64)
    idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    return chi[idx]


def _paley_i(q: int) -> torch.Tensor:
    jac = _jacobsthal(q)
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = jac
    return torch.eye(q + 1, dtype=torch.float64) + s


def _paley_ii(q: int) -> torch.Tensor:
    jac = _jacobsthal(q)
    c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    c[0, 1:] = 1
    c[1:, 0] = 1
    c[1:, 1:] = jac
    a = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    return torch.kron(c, a) + torch.kron(torch.eye(q + 1, dtype=torch.float64), b)


def paley_hadamard(m: int) -> torch.Tensor | None:
    """A ±1 Hadamard matrix of order m by Paley I or II with prime q, or None."""
    if m == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    if m == 2:
        return torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    if m % 4:
        return None
    if _is_prime(m - 1) and (m - 1) % 4 == 3:
        return _paley_i(m - 1)
    if _is_prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
        return _paley_ii(m // 2 - 1)
    return None


@functools.lru_cache(maxsize=64)
def small_factor(n: int) -> tuple[torch.Tensor, bool]:
    """(orthonormal H_m in float64, exact) with n = m · 2^k and 2^k as large as possible; see module doc."""
    power = n & -n
    k = power
    while k >= 1 and n // k <= MAX_DENSE_FACTOR:
        m = n // k
        had = paley_hadamard(m)
        if had is not None:
            had = had / m**0.5
            assert torch.allclose(had @ had.T, torch.eye(m, dtype=torch.float64), atol=1e-12)
            return had, True
        k //= 2
    m = n // power
    gen = torch.Generator().manual_seed(m)  # fixed: the transform must be the same everywhere
    q, r = torch.linalg.qr(torch.randn(m, m, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r)), False


def _fwht_butterflies(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[-1]
    shape = x.shape
    h = 1
    while h < n:
        x = x.reshape(-1, n // (2 * h), 2, h)
        x = torch.cat((x[:, :, 0] + x[:, :, 1], x[:, :, 0] - x[:, :, 1]), dim=-1)
        h *= 2
    return x.reshape(shape)


@functools.lru_cache(maxsize=32)
def _sylvester(n: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    """The unnormalized Sylvester Hadamard H_n (±1 entries, symmetric), built exactly by the butterflies."""
    return _fwht_butterflies(torch.eye(n, dtype=torch.float64)).to(dtype=dtype, device=device)


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalized Walsh–Hadamard transform over the last dim (a power of two): x H_{2^k}.

    One `linear` with the cached ±1 matrix (so `methods.core.cpu_gemm` routes it too) instead of log₂n butterfly
    passes, each a full read and write of x plus a concatenation: on this CPU (1 thread) 2.5x faster for the
    12·128-wide down_proj inputs and 8x for 64-wide heads. The two sum in different orders, so they agree to
    rounding (~5e-7 relative), not bit for bit."""
    n = x.shape[-1]
    assert n & (n - 1) == 0, f"fwht needs a power of two, got {n}"
    if n == 1:
        return x
    if not x.dtype.is_floating_point:
        return _fwht_butterflies(x)
    return torch.nn.functional.linear(x, _sylvester(n, x.dtype, str(x.device)))  # H symmetric: x Hᵀ = x H


def hadamard_transform(x: torch.Tensor) -> torch.Tensor:
    """x ↦ x Hᵀ over the last dim with H = H_m ⊗ H_{2^k} / √(2^k) orthonormal (H_m as in `small_factor`)."""
    n = x.shape[-1]
    had_m, _ = small_factor(n)
    m = had_m.shape[0]
    p = n // m
    y = x.reshape(*x.shape[:-1], m, p)
    if p > 1:
        y = fwht(y) / p**0.5
    if m > 1:
        y = torch.matmul(had_m.to(x.dtype), y)
    return y.reshape(x.shape)


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The dense orthonormal H that `hadamard_transform` applies (x Hᵀ)."""
    return hadamard_transform(torch.eye(n, dtype=torch.float64)).T.to(dtype)


def random_hadamard_matrix(
    n: int, seed: int, dtype: torch.dtype = torch.float64, signs_first: bool = True
) -> torch.Tensor:
    """QuaRot's randomized Hadamard Q = diag(s) · H with seeded random signs s ∈ {±1}ⁿ (orthonormal), applied as
    x ↦ x Q = (x ∘ s) H: the signs act *before* the mixing, as in the authors' code (Hadamard applied to the rows
    of diag(s)), so they change which combinations of x the rotated coordinates hold.

    `signs_first=False` gives H · diag(s), the version this harness used before: x H diag(s) only flips the
    signs of the rotated coordinates, so |x Q| — all a quantizer sees — does not depend on the seed. Kept only
    to re-create runs recorded with it."""
    gen = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (n,), generator=gen).to(torch.float64) * 2 - 1
    h = hadamard_matrix(n)
    return (signs[:, None] * h if signs_first else h * signs[None, :]).to(dtype)


def random_orthogonal_matrix(n: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Haar-random orthogonal matrix (QR of a seeded Gaussian, signs fixed)."""
    gen = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).to(dtype)
