"""Quantized formats as objects: storage counts every stored bit, packers round-trip and match the count,
and the memory report and latency evaluator ask the format (never the bit string)."""

import pytest
import torch

from harness.evaluate import latency
from harness.evaluate.memory import memory_report
from methods.core.arch import decoder_linears
from methods.core.formats import (
    FORMATS,
    BinaryWeight,
    LUTWeight,
    QuantizedWeight,
    TernaryWeight,
    UnknownFormat,
    check_format,
)
from methods.core.qlinear import set_quantized_weight
from methods.core.quantizers import WeightQuantizer
from qkernels.bench import KernelFormat

GEN = torch.Generator().manual_seed(0)
ROWS, COLS, GROUP = 8, 64, 32


def _lut(shared: bool, bits: int = 2) -> LUTWeight:
    codes = torch.randint(0, 2**bits, (ROWS, COLS), generator=GEN).to(torch.uint8)
    if shared:  # NF-style: one table, per-group scales
        levels = torch.linspace(-1, 1, 2**bits)
        return LUTWeight(codes, levels, bits, GROUP, scales=torch.rand(ROWS, COLS // GROUP, generator=GEN))
    levels = torch.randn(ROWS, COLS // GROUP, 2**bits, generator=GEN).sort(dim=-1).values
    return LUTWeight(codes, levels, bits, GROUP)


def _examples():
    weight = torch.randn(ROWS, COLS, generator=GEN)
    trits = torch.randint(-1, 2, (ROWS, COLS), generator=GEN).to(torch.int8)
    signs = (torch.randint(0, 2, (ROWS, COLS), generator=GEN) * 2 - 1).to(torch.int8)
    scales = torch.rand(ROWS, COLS // GROUP, generator=GEN) + 0.1
    return {
        "int4-sym-g32": WeightQuantizer(4, GROUP, sym=True).quantize(weight),
        "int2-sym-channel": WeightQuantizer(2, None, sym=True).quantize(weight),
        "int8-sym-g32": WeightQuantizer(8, GROUP, sym=True).quantize(weight),
        "lut2-per-group": _lut(shared=False),
        "lut4-shared": _lut(shared=True, bits=4),
        "ternary": TernaryWeight(trits, scales, GROUP),
        "binary": BinaryWeight(signs, scales, GROUP),
    }


@pytest.mark.parametrize("name", list(_examples()))
def test_storage_bits_equal_the_packed_bytes(name):
    """Widths that fill their words exactly (and ternary, whose count is its 5-trits-per-byte layout)."""
    q = _examples()[name]
    assert check_format(q) is q and q.dequantize().shape == (ROWS, COLS)
    assert q.storage_bits() == 8 * q.pack().nbytes()


def test_padded_layouts_cost_more_than_the_nominal_bits():
    weight = torch.randn(ROWS, 60, generator=GEN)
    int3 = WeightQuantizer(3, 20, sym=False).quantize(weight)  # 10 codes per word: 3.2 bits, plus zero words
    assert 8 * int3.pack().nbytes() > int3.storage_bits()
    assert QuantizedWeight(int3.codes, int3.scales, int3.zeros, 5, False, 20).pack() is None  # no int5 layout


def test_packers_round_trip():
    ex = _examples()
    assert torch.equal(ex["ternary"].pack().trits(), ex["ternary"].trits)
    assert torch.equal(ex["binary"].pack().signs(), ex["binary"].signs)
    lut = ex["lut4-shared"]
    assert torch.equal(lut.pack().codes(), lut.codes)


def test_dequantize_follows_each_definition():
    ex = _examples()
    tern = ex["ternary"]
    assert torch.equal(tern.dequantize()[:, :GROUP], tern.trits[:, :GROUP].float() * tern.scales[:, :1])
    lut = ex["lut2-per-group"]
    row, col = 3, 40
    assert lut.dequantize()[row, col] == lut.levels[row, col // GROUP, int(lut.codes[row, col])]
    shared = ex["lut4-shared"]
    expected = shared.levels[shared.codes[row, col].long()] * shared.scales[row, col // GROUP]
    assert torch.isclose(shared.dequantize()[row, col], expected)


def test_bad_tables_are_refused():
    codes = torch.zeros(ROWS, COLS, dtype=torch.uint8)
    with pytest.raises(ValueError, match="needs 4 levels"):
        LUTWeight(codes, torch.zeros(ROWS, 2, 8), 2, GROUP)
    with pytest.raises(ValueError, match="shared level table needs per-group scales"):
        LUTWeight(codes, torch.zeros(4), 2, GROUP)


def test_an_unknown_format_is_an_error_naming_the_known_ones(tiny):
    class Mystery:
        def storage_bits(self):
            return 0

    with pytest.raises(UnknownFormat, match="known: int, int-fpzero, lut, lut-signed, ternary, binary"):
        check_format(Mystery())
    model, _ = tiny
    name, parent, attr, module = next(iter(decoder_linears(model)))
    set_quantized_weight(
        parent,
        attr,
        module,
        _examples()["ternary"].__class__(
            torch.zeros_like(module.weight, dtype=torch.int8),
            torch.ones(module.weight.shape[0], 1),
            module.weight.shape[1],
        ),
    )
    getattr(parent, attr).qweight = Mystery()
    with pytest.raises(UnknownFormat):
        memory_report(model)
    with pytest.raises(UnknownFormat):
        latency.model_format(model, 16)


def _quantize_all(model, make):
    for _, parent, attr, module in decoder_linears(model):
        set_quantized_weight(parent, attr, module, make(module.weight.data))


def test_memory_and_latency_ask_the_format(tiny):
    model, _ = tiny

    def ternary(w):
        return TernaryWeight(torch.sign(w).to(torch.int8), w.abs().mean(dim=1, keepdim=True), w.shape[1])

    _quantize_all(model, ternary)
    report = memory_report(model)
    linears = [m for _, _, _, m in decoder_linears(model)]
    expected = sum(m.qweight.storage_bits() for m in linears)
    assert report.quantized_bits_per_weight == expected / report.quantized_weights
    assert 1.6 < report.quantized_bits_per_weight < 2.1  # 5 trits per byte + one fp16 scale per row
    assert report.packed_bits_per_weight == report.quantized_bits_per_weight
    assert latency.model_format(model, 16) == latency.NO_KERNEL  # never another format's kernel

    def lut2(w):
        rows, cols = w.shape
        levels = torch.tensor([-1.5, -0.5, 0.5, 1.5]).expand(rows, -(-cols // 16), 4) * w.abs().mean()
        return LUTWeight(torch.randint(0, 4, (rows, cols), generator=GEN).to(torch.uint8), levels, 2, 16)

    _quantize_all(model, lut2)
    assert latency.model_format(model, 16) == KernelFormat(2, 16, False, kind="lut")
    # with per-token integer activations the LUT weight runs on `lut_matmul_a` (RCP's W2A4)
    assert latency.model_format(model, 4) == KernelFormat(2, 16, False, 4, kind="lut")


def test_every_format_has_a_kernel_answer():
    for name, cls in FORMATS.items():
        assert cls.format_name == name and callable(cls.kernel_format)
