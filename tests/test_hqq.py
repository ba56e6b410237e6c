"""HQQ through the `hqq` package (methods/hqq.py): what we store is what the library computed; a missing library is
one line naming the peers environment, before any model loads. Library tests run where it is installed
(`nox -s peers`) and skip elsewhere."""

import importlib.util

import pytest
import torch

from harness import runner
from harness.cli_sweep import main as sweep_main
from methods.base import MissingLibrary


def _heavy_tailed(rows: int, cols: int) -> torch.Tensor:
    """Weights with outliers (a cubed Gaussian), where HQQ's l_p loss and min/max grids differ most."""
    generator = torch.Generator().manual_seed(0)
    return torch.randn(rows, cols, generator=generator) ** 3 * 0.02


def test_a_missing_library_is_one_line_naming_the_peers_environment(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "hqq" else real(name, *a))
    monkeypatch.setattr(runner.models, "load", lambda *a, **k: pytest.fail("a model loaded"))
    with pytest.raises(MissingLibrary) as refusal:
        runner.check_library("hqq")
    message = str(refusal.value)
    assert "\n" not in message and "`hqq`" in message and "nox -s peers" in message
    assert sweep_main(["method=hqq", "bits=w4g128a16kv16", "budget=smoke"], multirun=True) == 2
    assert capsys.readouterr().err.strip() == f"error: {message}"
    runner.check_library("rtn")  # a method of our own needs nothing


def test_storage_counts_fp16_zeros_and_nothing_is_packed():
    from methods.core.formats import FloatZeroWeight

    codes = torch.zeros(4, 256, dtype=torch.uint8)
    weight = FloatZeroWeight(codes, torch.ones(4, 2), torch.full((4, 2), 7.5), bits=4, sym=False, group_size=128)
    assert weight.storage_bits() / codes.numel() == 4 + 32 / 128
    assert weight.pack() is None and weight.kernel_format(16) is None
    assert torch.equal(weight.dequantize(), torch.full((4, 256), -7.5))  # a zero off the integer grid


@pytest.fixture()
def hqq():
    pytest.importorskip("hqq", reason="the hqq package is installed by `nox -s peers`")
    from methods import hqq

    return hqq


def test_codes_scales_and_zeros_are_the_librarys(hqq):
    from hqq.core.quantize import Quantizer

    weight = _heavy_tailed(64, 256)
    ours = hqq.hqq_weight(weight, 4, 128, hqq.HQQConfig())
    params = hqq._library_params(4, 128, hqq.HQQConfig())
    codes, meta = Quantizer.quantize(weight.clone(), bitpack=False, device="cpu", **params)
    assert torch.equal(ours.codes.float(), codes.reshape(64, 256))
    assert torch.equal(ours.scales, meta["scale"].reshape(64, 2).half().float())
    assert torch.equal(ours.zeros, meta["zero"].reshape(64, 2).half().float())
    assert not torch.equal(ours.zeros, ours.zeros.round())  # the solver moved zeros off the integer grid


def test_a_width_that_is_not_a_multiple_of_the_group_keeps_each_group_inside_a_row(hqq):
    weight = _heavy_tailed(8, 576)  # SmolLM2's hidden size at g128: 4 full groups and one of 64
    ours = hqq.hqq_weight(weight, 3, 128, hqq.HQQConfig())
    assert ours.scales.shape == (8, 5) and ours.group_size == 128
    tail = hqq.hqq_weight(weight[:, 512:], 3, 64, hqq.HQQConfig())
    assert torch.equal(ours.dequantize()[:, 512:], tail.dequantize())


def test_optimize_false_is_the_librarys_min_max_start(hqq):
    weight = _heavy_tailed(16, 256)
    start = hqq.hqq_weight(weight, 4, 64, hqq.HQQConfig(optimize=False))
    grouped = weight.reshape(16, 4, 64)
    low, high = grouped.amin(-1), grouped.amax(-1)
    assert torch.allclose(start.scales, ((high - low) / 15).half().float(), rtol=1e-3)
    assert torch.equal(start.zeros, start.zeros.round())  # 4 bits: the library rounds the zero, nothing moves it
    solved = hqq.hqq_weight(weight, 4, 64, hqq.HQQConfig())
    assert torch.equal(solved.scales, start.scales) and not torch.equal(solved.zeros, start.zeros)  # scale fixed
