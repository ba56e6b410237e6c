"""Bit allocation under an exact budget (methods/core/allocation.py; RSAVQ's WCSG, reconstructed)."""

from __future__ import annotations

import itertools

import pytest
import torch

from methods.core.allocation import allocate_bits, geometric_allocation, predicted_loss


def test_two_units_the_more_sensitive_gets_the_wider_codebook():
    bits = allocate_bits(torch.tensor([1.0, 50.0]), (1, 2, 3), average=2.0)
    assert bits.tolist() == [1, 3] and bits.sum() == 4
    assert allocate_bits(torch.tensor([50.0, 1.0]), (1, 2, 3), average=2.0).tolist() == [3, 1]
    assert allocate_bits(torch.tensor([1.0, 1.5]), (1, 2, 3), average=2.0).tolist() == [2, 2]  # 4x apart needed


@pytest.mark.parametrize("seed", range(5))
def test_the_budget_is_met_exactly_and_no_allocation_predicts_less(seed):
    sensitivity = torch.rand(6, generator=torch.Generator().manual_seed(seed)) ** 4 * 100
    bits = allocate_bits(sensitivity, (1, 2, 3), average=2.0)
    assert int(bits.sum()) == 12 and set(bits.tolist()) <= {1, 2, 3}
    best = min(
        predicted_loss(sensitivity, torch.tensor(combo))
        for combo in itertools.product((1, 2, 3), repeat=6)
        if sum(combo) == 12
    )
    assert predicted_loss(sensitivity, bits) == pytest.approx(best)


def test_the_continuous_optimum_is_half_log2_of_the_ratio_to_the_geometric_mean():
    widths = geometric_allocation(torch.tensor([1.0, 16.0]), average=2.0)
    assert torch.allclose(widths, torch.tensor([1.0, 3.0], dtype=torch.float64))  # log2(4) / 2 = 1 each way


def test_budgets_the_choices_cannot_meet_fail_with_the_fix():
    with pytest.raises(ValueError, match="not a whole number of bits"):
        allocate_bits(torch.ones(3), (1, 2, 3), average=2.5)
    with pytest.raises(ValueError, match="outside the choices"):
        allocate_bits(torch.ones(2), (1, 2, 3), average=3.5)
    with pytest.raises(ValueError, match="cannot spend exactly"):
        allocate_bits(torch.ones(2), (1, 3), average=2.5)
