"""Vector quantization of a linear's weight: the `VQWeight` format, weighted k-means codebooks and the GPTQ-style
column-block solver with error feedback (GPTVQ's scheme: van Baalen et al., arXiv 2402.15319), the primitives
RSAVQ's plain-VQ baseline and its Fisher-guided variants compose (issue 44).

* Vectors: each row's weights cut into runs of `dim` consecutive inputs (column block j holds inputs
  j·dim … j·dim + dim − 1); `dim` must divide the input width.
* `VQWeight` (in `methods.core.formats`, with the other formats): per column block, an index into that block's
  codebook (blocks may use different codebooks, e.g. sizes 16 / 256 / 4096 for 1 / 2 / 3 bits per weight at dim
  4); codebooks in fp16; `storage_bits()` = the stored buffers' bytes × 8.
* `weighted_kmeans`: Lloyd's algorithm where each entry of each vector carries a weight (a diagonal metric,
  e.g. the diagonal Fisher information): assignment by Σ_j w_j (x_j − c_j)², centroids the weighted means per
  dimension. With equal weights it is plain k-means (scikit-learn's KMeans gives the same result from the same
  start, a test); scikit-learn's sample weights weigh whole vectors, not entries, so the loop is written here.
* `gptvq_quantize`: visits the column blocks in order; for each, every row's vector goes to its nearest
  centroid under a given per-entry metric, and the rounding error is pushed onto the later columns through the
  upper Cholesky factor U of the damped inverse Hessian, E = (W_B − Q_B) U_BB⁻¹, W_rest −= E U_B,rest — GPTQ's
  update (Frantar et al., Eq. 3) with a block of `dim` columns quantized jointly.
"""

from __future__ import annotations

import torch

from methods.core.formats import VQWeight
from methods.core.gptq import _inverse_hessian_cholesky


def nearest(vectors: torch.Tensor, codebook: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Index of the nearest centroid of each vector [n, dim] under Σ_j w_j (x_j − c_j)² (w [n, dim] or None)."""
    if weights is None:
        return torch.cdist(vectors.double(), codebook.double()).argmin(dim=1)
    # Σ w x² is the same for every centroid: argmin of Σ w c² − 2 Σ w x c
    w = weights.double()
    cost = w @ (codebook.double() ** 2).T - 2 * (w * vectors.double()) @ codebook.double().T
    return cost.argmin(dim=1)


def weighted_kmeans(
    vectors: torch.Tensor, size: int, weights: torch.Tensor | None = None, iters: int = 25, seed: int = 0
) -> torch.Tensor:
    """Codebook [size, dim] for vectors [n, dim] by Lloyd's algorithm under the per-entry metric (module
    docstring), started from `size` distinct vectors drawn with `seed`; an emptied centroid keeps its place."""
    x = vectors.double()
    w = torch.ones_like(x) if weights is None else weights.double().clamp_min(0)
    start = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[: min(size, x.shape[0])]
    centroids = x[start].clone()
    if centroids.shape[0] < size:  # fewer vectors than centroids: repeat (the extra ones stay unused)
        centroids = centroids[torch.arange(size) % centroids.shape[0]]
    for _ in range(iters):
        assign = nearest(x, centroids, None if weights is None else w)
        weight_sum = torch.zeros_like(centroids).index_add_(0, assign, w)
        moved = torch.zeros_like(centroids).index_add_(0, assign, w * x)
        updated = torch.where(weight_sum > 0, moved / weight_sum.clamp_min(1e-300), centroids)
        if torch.equal(updated, centroids):
            break
        centroids = updated
    return centroids.float()


def as_vectors(weight: torch.Tensor, dim: int) -> torch.Tensor:
    """[rows, cols] -> [rows · cols / dim, dim]: each row cut into runs of `dim` consecutive inputs."""
    rows, cols = weight.shape
    if cols % dim:
        raise ValueError(f"vector dim {dim} must divide the input width {cols}")
    return weight.reshape(rows * cols // dim, dim)


@torch.no_grad()
def gptvq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    codebooks: list[torch.Tensor],
    block_codebook: torch.Tensor,
    dim: int,
    damp: float = 0.01,
    metric: torch.Tensor | None = None,
) -> VQWeight:
    """Quantize weight [rows, cols] block by block with GPTQ's error feedback (module docstring). `metric`
    [rows, cols]: per-entry weights of the assignment distance (None: squared error); column block j uses
    `codebooks[block_codebook[j]]`."""
    w = weight.double().clone()
    rows, cols = w.shape
    as_vectors(w, dim)  # checks dim | cols
    h = hessian.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    upper = _inverse_hessian_cholesky(h, damp)
    blocks = cols // dim
    indices = torch.zeros(rows, blocks, dtype=torch.long)
    for block in range(blocks):
        span = slice(block * dim, (block + 1) * dim)
        book = codebooks[int(block_codebook[block])].double()
        chosen = nearest(w[:, span], book, None if metric is None else metric[:, span])
        indices[:, block] = chosen
        error = torch.linalg.solve_triangular(upper[span, span], (w[:, span] - book[chosen]), upper=True, left=False)
        w[:, span.stop :] -= error @ upper[span, span.stop :]
    return VQWeight(indices, [b.to(torch.float16) for b in codebooks], block_codebook.clone(), dim)
