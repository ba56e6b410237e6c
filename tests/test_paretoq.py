"""ParetoQ on tiny-llama: what it accepts, its step budget per bit width, the formats it leaves, and that at
zero steps 4-bit LSQ is symmetric per-channel RTN."""

from dataclasses import replace

import pytest
import torch
from compose import quantize

from harness.models import byte_tokenizer, tiny_llama
from harness.spec import BitSpec
from methods import paretoq, rtn
from methods.base import QuantContext, Request, UnsupportedBits
from methods.core.arch import ARCHS, decoder_linears
from methods.core.formats import BinaryWeight, LUTWeight, QuantizedWeight, TernaryWeight


def _cfg(**loop) -> paretoq.ParetoQConfig:
    default = paretoq.ParetoQConfig()
    return replace(default, loop=replace(default.loop, **loop))


def _ctx():
    ids = byte_tokenizer()("ParetoQ trains every parameter with cross-entropy. " * 30).input_ids[: 8 * 32]
    windows = torch.tensor(ids).reshape(8, 32)
    return QuantContext(seed=0, calibration=lambda: [], training=lambda: windows)


@pytest.mark.parametrize("bits", ["w4g128a16kv16", "w4a4kv16", "w5a16kv16", "w8a16kv16"])
def test_refuses_what_the_paper_does_not_train(bits):
    with pytest.raises(UnsupportedBits, match="paretoq does not support"):
        paretoq.supports(Request(BitSpec.parse(bits), ARCHS["llama"]))


def test_low_bit_runs_train_three_times_longer():
    cfg = _cfg(steps=120)
    assert [paretoq.steps_for(cfg, BitSpec.parse(f"w{b}a16kv16"), 1000) for b in ("1", "1.58", "2", "3", "4")] == [
        120,
        120,
        120,
        40,
        40,
    ]
    assert paretoq.steps_for(_cfg(batch_size=4), BitSpec.parse("w2a16kv16"), 1000) == 250


@pytest.mark.parametrize(
    ("bits", "fmt"),
    [
        ("w1a16kv16", BinaryWeight),
        ("w1.58a16kv16", TernaryWeight),
        ("w2a16kv16", LUTWeight),
        ("w3a16kv16", QuantizedWeight),
    ],
)
def test_trains_and_leaves_the_bit_widths_format(bits, fmt):
    model, _ = tiny_llama(seed=0)
    embeddings = model.model.embed_tokens.weight.detach().clone()
    summary = paretoq.quantize(model, _cfg(steps=3, lr=1e-3), BitSpec.parse(bits), _ctx())
    steps = 3 if bits != "w3a16kv16" else 1
    assert summary.metrics["train_steps"] == steps and summary.metrics["train_tokens"] == steps * 2 * 32
    assert all(isinstance(m.qweight, fmt) for _, _, _, m in decoder_linears(model))
    assert not torch.equal(model.model.embed_tokens.weight, embeddings)  # every parameter trains
    assert not any(p.requires_grad for p in model.parameters())


def test_zero_steps_of_four_bit_lsq_is_symmetric_per_channel_rtn():
    trained, _ = tiny_llama(seed=0)
    paretoq.quantize(trained, _cfg(steps=0), BitSpec.parse("w4a16kv16"), _ctx())
    reference, _ = tiny_llama(seed=0)
    quantize(reference, "rtn", rtn.RTNConfig(w_sym=True), "w4a16kv16")
    ids = torch.arange(64).reshape(2, 32)
    with torch.no_grad():
        assert torch.allclose(trained(ids).logits, reference(ids).logits, atol=1e-5)
