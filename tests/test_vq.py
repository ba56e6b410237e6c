"""Vector-quantization primitives (methods/core/vq.py) and the VQWeight format (methods/core/formats.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans

from methods.core.formats import VQWeight, check_format
from methods.core.gptq import _inverse_hessian_cholesky
from methods.core.vq import as_vectors, gptvq_quantize, nearest, weighted_kmeans


def _hessian(cols: int, seed: int = 0) -> torch.Tensor:
    x = torch.randn(4 * cols, cols, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x[:, 1] *= 5  # an input with a large activation, as LLM inputs have
    return 2 * x.T @ x / x.shape[0]


def test_equal_weights_give_plain_kmeans_from_the_same_start():
    """A constant per-entry metric (a constant Fisher) changes nothing: the same codebook as scikit-learn's
    k-means started from the same centroids, and the same assignment."""
    vectors = torch.randn(600, 4, generator=torch.Generator().manual_seed(0))
    start = vectors[torch.randperm(600, generator=torch.Generator().manual_seed(0))[:16]]
    ours = weighted_kmeans(vectors, 16, torch.full_like(vectors, 3.0), iters=100, seed=0)
    oracle = KMeans(16, init=start.double().numpy(), n_init=1, max_iter=100, tol=0).fit(vectors.double().numpy())
    assert torch.allclose(ours.double(), torch.from_numpy(oracle.cluster_centers_), atol=1e-5)
    assert torch.equal(nearest(vectors, ours, torch.full_like(vectors, 3.0)), nearest(vectors, ours))
    assert torch.equal(weighted_kmeans(vectors, 16, None, iters=100, seed=0), ours)


def test_the_metric_moves_assignments_and_centroids_toward_the_heavy_entries():
    """Hand-made: the point (1, 10) is nearer the centroid (3, 9) than (0, 0) in plain squared distance (5 vs 101)
    but nearer (0, 0) when its second entry weighs 0.01 (2 vs 4.01); a weighted centroid is the weighted mean."""
    book = torch.tensor([[0.0, 0.0], [3.0, 9.0]])
    point = torch.tensor([[1.0, 10.0]])
    assert nearest(point, book).item() == 1
    assert nearest(point, book, torch.tensor([[1.0, 0.01]])).item() == 0
    vectors = torch.tensor([[0.0, 0.0], [2.0, 4.0]])
    weights = torch.tensor([[1.0, 3.0], [3.0, 1.0]])
    (centroid,) = weighted_kmeans(vectors, 1, weights, iters=3)
    assert torch.allclose(centroid, torch.tensor([1.5, 1.0]))  # (0·1 + 2·3)/4, (0·3 + 4·1)/4


def test_vectors_that_are_centroids_quantize_exactly():
    codebook = torch.randn(16, 4, generator=torch.Generator().manual_seed(1)).half().float()
    picks = torch.randint(0, 16, (8, 6), generator=torch.Generator().manual_seed(2))
    weight = codebook[picks].reshape(8, 24)
    q = gptvq_quantize(weight, _hessian(24), [codebook], torch.zeros(6, dtype=torch.long), dim=4)
    assert torch.equal(q.indices, picks) and torch.equal(q.dequantize(), weight)


def test_one_column_blocks_are_gptq_column_by_column():
    """dim = 1: the solver is GPTQ's (Frantar et al., Alg. 1) with the codebook as the grid, written out here."""
    g = torch.Generator().manual_seed(3)
    weight, hessian = torch.randn(5, 12, generator=g, dtype=torch.float64), _hessian(12, seed=4)
    levels = torch.linspace(-1.5, 1.5, 4, dtype=torch.float64)[:, None]
    q = gptvq_quantize(weight, hessian, [levels], torch.zeros(12, dtype=torch.long), dim=1)
    w, upper = weight.clone(), _inverse_hessian_cholesky(hessian, 0.01)
    expected = torch.zeros(5, 12)
    for col in range(12):
        rounded = levels[(w[:, col : col + 1] - levels.T).abs().argmin(dim=1), 0]
        expected[:, col] = rounded.float()
        error = (w[:, col] - rounded) / upper[col, col]
        w[:, col + 1 :] -= error[:, None] * upper[col, col + 1 :][None, :]
    assert torch.allclose(q.dequantize(), expected)


def test_a_block_error_is_spread_as_the_remaining_inverse_hessian_says():
    """dim = 2, one block: the later columns move by −δ (H⁻¹_FF)_BB⁻¹ (H⁻¹_FF)_B,rest with F the columns not yet
    quantized — the optimal compensation for a fixed error δ on block B, from dense inverses."""
    g = torch.Generator().manual_seed(5)
    weight, hessian = torch.randn(3, 6, generator=g, dtype=torch.float64), _hessian(6, seed=6)
    book = torch.tensor([[0.0, 0.0], [1.0, -1.0]], dtype=torch.float64)
    q = gptvq_quantize(weight, hessian, [book], torch.zeros(3, dtype=torch.long), dim=2)
    damped = hessian + 0.01 * torch.diag(hessian).mean() * torch.eye(6, dtype=torch.float64)
    delta = weight[:, :2] - book[q.indices[:, 0]]
    inverse = torch.linalg.inv(damped)
    moved = weight[:, 2:4] - delta @ torch.linalg.solve(inverse[:2, :2], inverse[:2, 2:4])
    assert torch.equal(q.indices[:, 1], nearest(moved, book))


def test_storage_counts_the_packed_indices_codebooks_and_selectors():
    """Two codebooks (K = 16 and 256, dim 4): 4- and 8-bit indices packed per row in int32 words (8 and 4 per
    word), fp16 codebooks, and a 1-bit selector per column block."""
    books = [torch.randn(16, 4), torch.randn(256, 4)]
    blocks = torch.tensor([0, 1, 1, 0, 1, 1, 1, 0, 0, 1])  # 4 blocks use the small book, 6 the large
    indices = torch.stack([torch.randint(0, 16 if b == 0 else 256, (7,)) for b in blocks], dim=1)
    q = check_format(VQWeight(indices, [b.half() for b in books], blocks, dim=4))
    words = 7 * (1 + 2)  # per row: 4 small indices in 1 word, 6 large ones in 2 words
    expected = words * 32 + (16 + 256) * 4 * 16 + 1 * 32  # + 10 one-bit selectors in one word
    assert q.storage_bits() == expected
    deq = q.dequantize().reshape(7, 10, 4)
    assert torch.equal(deq[:, 1], books[1].half().float()[indices[:, 1]])
    assert q.bits_per_block().tolist() == [4, 8, 8, 4, 8, 8, 8, 4, 4, 8] and q.kernel_format(16) is None


def test_bad_vector_dims_fail_with_the_fix():
    with pytest.raises(ValueError, match="vector dim 3 must divide the input width 8"):
        as_vectors(torch.zeros(2, 8), 3)
    assert np.isfinite(gptvq_quantize(torch.zeros(2, 8), torch.zeros(8, 8), [torch.zeros(2, 4)],
                                      torch.zeros(2, dtype=torch.long), dim=4).dequantize().numpy()).all()  # fmt: skip
