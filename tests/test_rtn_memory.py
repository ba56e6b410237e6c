import torch
from compose import quantize

from harness.evaluate.memory import memory_report
from harness.spec import BitSpec
from methods import rtn
from methods.base import QuantContext
from methods.core.arch import decoder_linears
from methods.core.attention import uniform_kv_bytes_per_token
from methods.core.qlinear import QLinear
from methods.kv import rtn as kv_rtn


def _ctx():
    return QuantContext(seed=0, calibration=lambda: (_ for _ in ()).throw(AssertionError("RTN needs no data")))


def _quantize_rtn(model, bits: str) -> None:
    quantize(model, "rtn", rtn.RTNConfig(), bits)


def _logits(model):
    ids = torch.arange(96).reshape(1, 96) % 250
    return model(ids).logits


def test_fp_bits_change_nothing(tiny):
    model, _ = tiny
    before = _logits(model)
    _quantize_rtn(model, "w16a16kv16")
    assert torch.equal(before, _logits(model))


def test_each_quantizer_acts(tiny):
    model, _ = tiny
    before = _logits(model)
    for bits in ("w4a16kv16", "w16a4kv16", "w16a16kv4"):
        import harness.models as models

        fresh, _ = models.tiny_llama(seed=0)
        _quantize_rtn(fresh, bits)
        after = _logits(fresh)
        assert not torch.equal(before, after), bits
        assert (after - before).abs().max() < 1.0, bits  # a perturbation, not a broken model


def test_memory_accounting_on_rtn_w4g32(tiny):
    model, _ = tiny
    full = memory_report(model)
    assert full.quantized_bits_per_weight == 16.0
    assert full.sixteen_bit_params == sum(p.numel() for p in model.parameters())  # tied counted once
    rtn.quantize(model, rtn.RTNConfig(), BitSpec.parse("w4g32a16kv16"), _ctx())
    report = memory_report(model)
    linears = [m for _, _, _, m in decoder_linears(model)]
    assert all(isinstance(m, QLinear) for m in linears)
    n = sum(m.weight.numel() for m in linears)
    assert report.quantized_weights == n
    assert abs(report.quantized_bits_per_weight - (4 + (16 + 4) / 32)) < 1e-9
    assert report.model_bytes == (n * (4 + 20 / 32) + 16 * report.sixteen_bit_params) // 8


def test_kv_bytes(tiny):
    model, _ = tiny
    # 2 layers, 2 kv heads, head_dim 16; one fp16 scale (+ fp16 zero when asymmetric) per head
    assert uniform_kv_bytes_per_token(model, 16, True, None) == 2 * 2 * 2 * 16 * 2
    assert uniform_kv_bytes_per_token(model, 4, False, None) == 2 * 2 * 2 * 16 * 0.5 + 2 * 2 * 2 * 4
    assert uniform_kv_bytes_per_token(model, 4, True, 8) == 2 * 2 * 2 * 16 * 0.5 + 2 * 2 * 2 * 2 * 2
    assert kv_rtn.build(kv_rtn.RTNKVConfig(), 4).bytes_per_token(model) == uniform_kv_bytes_per_token(
        model, 4, False, None
    )
    assert memory_report(model).kv_bytes_per_token == 2 * 2 * 2 * 16 * 2


def test_packed_bytes_count_the_int3_word_layout(tiny):
    from qkernels.packing import packed_nbytes

    model, _ = tiny
    rtn.quantize(model, rtn.RTNConfig(), BitSpec.parse("w3g32a16kv16"), _ctx())
    report = memory_report(model)
    linears = [m for _, _, _, m in decoder_linears(model)]
    expected = sum(
        8 * packed_nbytes(*m.qweight.codes.shape, m.qweight.scales.shape[1], 3, m.qweight.sym) for m in linears
    )
    assert report.packed_bits_per_weight == expected / report.quantized_weights
    # 10 codes per 32-bit word: 3.2 bits per code (plus row padding) against the nominal 3.
    assert report.packed_bits_per_weight > report.quantized_bits_per_weight + 0.2
    assert "packed_bits_per_weight" in report.metrics()
    # The shapes-and-format formula (used for runs logged before the metric existed) gives the same number.
    from harness.evaluate.latency import block_shapes
    from harness.evaluate.memory import packed_bits_per_weight

    assert packed_bits_per_weight(block_shapes(model), 3, 32, False) == report.packed_bits_per_weight


def test_no_packed_bytes_without_a_packed_format(tiny):
    model, _ = tiny
    rtn.quantize(model, rtn.RTNConfig(), BitSpec.parse("w5a16kv16"), _ctx())
    report = memory_report(model)
    assert report.packed_bits_per_weight is None and "packed_bits_per_weight" not in report.metrics()
