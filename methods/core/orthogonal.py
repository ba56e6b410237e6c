"""Structured random orthogonal transforms, stored as a seed and applied in O(n·(a + b)) per vector.

QuIP (Chee et al., NeurIPS 2023, §4 "efficient incoherence processing") multiplies weights and Hessians by
random orthogonal matrices that are Kronecker products U = U_a ⊗ U_b of two small Haar-random factors, with
n = a·b split as evenly as the prime factors allow, plus random permutations of the coordinates. Two variants:

* `kron` (the paper's): one a×a and one b×b factor, U = P_out (U_a ⊗ U_b) P_in;
* `butterfly` (the authors' code, `gen_rand_ortho_butterfly`): view the vector as an a×b array; mix each of
  its b columns with its own a×a factor, then each of its a rows with its own b×b factor — 2 stages of
  independent small blocks, a random permutation on each side.

Both split n by alternating its sorted prime factors (576 = 24·24, 1536 = 32·48, 640 = 16·40, 192 = 24·8), as
the authors' code does. Factors are Haar-random orthogonal (QR of a seeded Gaussian, signs fixed); a prime n
has factors (n, 1): one dense Haar matrix. The transform is regenerated from its seed, so storage is the seed.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

KINDS = ("kron", "butterfly")
SEED_BITS = 64


def prime_factors(n: int) -> list[int]:
    factors, p = [], 2
    while p * p <= n:
        while n % p == 0:
            factors.append(p)
            n //= p
        p += 1
    return factors + ([n] if n > 1 else [])


def split_factors(n: int) -> tuple[int, int]:
    """n = a·b from the sorted prime factors taken alternately (the authors' `butterfly_factors`)."""
    primes = prime_factors(n)
    return math.prod(primes[0::2]), math.prod(primes[1::2])


def _haar(count: int, p: int, gen: torch.Generator) -> torch.Tensor:
    """`count` independent Haar-random p×p orthogonal matrices, float64."""
    gauss = torch.randn(count, p, p, generator=gen, dtype=torch.float64)
    q, r = torch.linalg.qr(gauss)
    return q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)


@dataclass
class StructuredOrthogonal:
    """U = P_out · B · P_in, B the two-stage product of small orthogonal blocks (module docstring).
    `left` [1 or b, a, a] mixes along the a-axis, `right` [1 or a, b, b] along the b-axis."""

    n: int
    seed: int
    kind: str
    left: torch.Tensor
    right: torch.Tensor
    perm_in: torch.Tensor
    perm_out: torch.Tensor

    @classmethod
    def random(cls, n: int, seed: int, kind: str = "kron") -> StructuredOrthogonal:
        if kind not in KINDS:
            raise ValueError(f"orthogonal transform kind must be one of {', '.join(KINDS)}, got {kind!r}")
        a, b = split_factors(n)
        gen = torch.Generator().manual_seed(seed)
        left = _haar(1 if kind == "kron" else b, a, gen)
        right = _haar(1 if kind == "kron" else a, b, gen)
        perm_in, perm_out = torch.randperm(n, generator=gen), torch.randperm(n, generator=gen)
        return cls(n, seed, kind, left, right, perm_in, perm_out)

    @property
    def shape(self) -> tuple[int, int]:
        return self.left.shape[-1], self.right.shape[-1]

    def _stages(self, x: torch.Tensor, transpose: bool) -> torch.Tensor:
        a, b = self.shape
        left, right = self.left.to(x.dtype), self.right.to(x.dtype)
        if transpose:  # Bᵀ: undo the b-axis stage, then the a-axis stage
            left, right = left.transpose(-1, -2), right.transpose(-1, -2)
        grid = x.reshape(-1, a, b)  # [N, a, b]
        stages = ("right", "left") if transpose else ("left", "right")
        for stage in stages:
            if stage == "left":  # each column j of the a×b array ↦ left[j] · column
                if self.kind == "kron":
                    grid = left[0] @ grid
                else:  # one batched GEMM: [b, a, a] @ [b, a, N]
                    grid = torch.bmm(left, grid.permute(2, 1, 0)).permute(2, 1, 0)
            elif self.kind == "kron":  # each row i ↦ right[i] · row
                grid = grid @ right[0].T
            else:  # [a, b, b] @ [a, b, N]
                grid = torch.bmm(right, grid.permute(1, 2, 0)).permute(2, 0, 1)
        return grid.reshape(x.shape)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Each vector v along the last dim ↦ U v (i.e. x ↦ x Uᵀ)."""
        y = self._stages(x[..., self.perm_in], transpose=False)
        return y[..., self.perm_out]

    def apply_transpose(self, x: torch.Tensor) -> torch.Tensor:
        """Each vector v along the last dim ↦ Uᵀ v (i.e. x ↦ x U): the inverse of `apply`."""
        y = torch.empty_like(x)
        y[..., self.perm_out] = x
        y = self._stages(y, transpose=True)
        out = torch.empty_like(y)
        out[..., self.perm_in] = y
        return out

    def dense(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The n×n matrix U."""
        return self.apply(torch.eye(self.n, dtype=dtype)).T

    def storage_bits(self) -> int:
        """Regenerated from its seed: a deployment stores the seed only."""
        return SEED_BITS


@functools.cache
def _hadamard(n: int) -> torch.Tensor:
    from methods.core.hadamard import hadamard_matrix

    return hadamard_matrix(n)


@dataclass
class RandomizedHadamard:
    """QuIP#'s randomized Hadamard transform (Tseng et al. 2024, §3): U = H · diag(s), s seeded random signs, H the
    orthonormal Hadamard of order n (`methods.core.hadamard`: Sylvester ⊗ Paley, exact for 576, 1536, 640, 192).
    Same interface as `StructuredOrthogonal`; stored as its seed (the authors store the signs as fp16 vectors
    because their fine-tuning changes them)."""

    n: int
    seed: int
    signs: torch.Tensor

    @classmethod
    def random(cls, n: int, seed: int) -> RandomizedHadamard:
        gen = torch.Generator().manual_seed(seed)
        return cls(n, seed, torch.randint(0, 2, (n,), generator=gen).double() * 2 - 1)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """v ↦ H (s ∘ v) along the last dim."""
        return (x * self.signs.to(x.dtype)) @ _hadamard(self.n).to(x.dtype).T

    def apply_transpose(self, x: torch.Tensor) -> torch.Tensor:
        """v ↦ s ∘ (Hᵀ v): the inverse of `apply`."""
        return (x @ _hadamard(self.n).to(x.dtype)) * self.signs.to(x.dtype)

    def dense(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        return self.apply(torch.eye(self.n, dtype=dtype)).T

    def storage_bits(self) -> int:
        return SEED_BITS
