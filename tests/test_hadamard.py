import pytest
import torch

from methods.core.hadamard import (
    fwht,
    hadamard_matrix,
    hadamard_transform,
    paley_hadamard,
    random_hadamard_matrix,
    small_factor,
)


@pytest.mark.parametrize("m", [12, 20, 28, 36, 44])
def test_paley_matrices_are_hadamard(m):
    h = paley_hadamard(m)
    assert h is not None and set(h.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(h @ h.T, m * torch.eye(m, dtype=torch.float64))


@pytest.mark.parametrize(
    "n, factor, exact",
    [(64, 1, True), (192, 12, True), (576, 36, True), (1536, 12, True), (11008, 43, False), (9, 9, False)],
)
def test_orders_the_models_need(n, factor, exact):
    had_m, is_exact = small_factor(n)
    assert had_m.shape[0] == factor and is_exact == exact
    if n > 2048:  # too big to materialise cheaply: the transform must preserve inner products
        x = torch.randn(16, n, dtype=torch.float64)
        y = hadamard_transform(x)
        assert torch.allclose(y @ y.T, x @ x.T, atol=1e-8 * n)
        return
    h = hadamard_matrix(n)
    assert torch.allclose(h @ h.T, torch.eye(n, dtype=torch.float64), atol=1e-10)
    if exact:  # a true Hadamard: every entry ±1/√n
        assert torch.allclose(h.abs(), torch.full_like(h, n**-0.5))


def test_fast_transform_equals_dense_matrix():
    x = torch.randn(5, 3, 576, dtype=torch.float64)
    assert torch.allclose(hadamard_transform(x), x @ hadamard_matrix(576).T, atol=1e-12)
    y = torch.randn(4, 128, dtype=torch.float64)
    sylvester = hadamard_matrix(128) * 128**0.5
    assert torch.allclose(fwht(y), y @ sylvester.T, atol=1e-10)


def test_random_hadamard_is_seeded_and_orthogonal():
    a, b, c = random_hadamard_matrix(96, 0), random_hadamard_matrix(96, 0), random_hadamard_matrix(96, 1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.allclose(a @ a.T, torch.eye(96, dtype=torch.float64), atol=1e-12)


def test_random_signs_act_before_the_hadamard_so_the_seed_changes_magnitudes():
    """Q = diag(s)·H (the authors'): |x Q| depends on the seed. H·diag(s) (the old, wrong order) only flips the
    signs of x H, so every seed gives the same magnitudes — the randomisation did nothing for a quantizer."""
    x = torch.randn(8, 96, dtype=torch.float64)
    q0, q1 = random_hadamard_matrix(96, 0), random_hadamard_matrix(96, 1)
    assert not torch.allclose((x @ q0).abs(), (x @ q1).abs(), atol=1e-6)
    h = hadamard_matrix(96)
    signs = torch.diagonal(q0 @ h.T)  # Q Hᵀ = diag(s)
    assert torch.equal(signs.abs().round(), torch.ones(96, dtype=torch.float64))
    assert torch.allclose(q0, torch.diag(signs) @ h, atol=1e-12)
    old0, old1 = (random_hadamard_matrix(96, seed, signs_first=False) for seed in (0, 1))
    assert torch.allclose((x @ old0).abs(), (x @ old1).abs(), atol=1e-12)
