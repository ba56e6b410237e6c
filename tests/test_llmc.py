"""The llm-compressor peers (methods/core/llmc.py, methods/awq.py, methods/gptq_llmc.py): the library sees exactly
our calibration windows, what we store dequantizes to the library's own fake-quantized weight, and a missing
library is one line naming `nox -s llmc`. Library tests run where it is installed (`nox -s llmc`), skip elsewhere."""

import importlib.util

import pytest
import torch

from harness import runner
from harness.cli_sweep import main as sweep_main
from harness.models import tiny_gemma3, tiny_llama
from methods.base import MissingLibrary, QuantContext, UnsupportedBits
from methods.core import llmc
from methods.core.bits import BitSpec
from methods.core.qlinear import QLinear

needs_library = pytest.mark.skipif(
    importlib.util.find_spec("llmcompressor") is None, reason="needs the `llmcompressor` package (nox -s llmc)"
)


def _windows(model, count: int = 4, seqlen: int = 32) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, model.config.vocab_size, (1, seqlen), generator=generator) for _ in range(count)]


@pytest.mark.parametrize("method", ["awq", "gptq_llmc"])
def test_a_missing_library_is_one_line_naming_the_llmc_environment(method, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llmcompressor" else real(name, *a)
    )
    monkeypatch.setattr(runner.models, "load", lambda *a, **k: pytest.fail("a model loaded"))
    with pytest.raises(MissingLibrary) as refusal:
        runner.check_library(method)
    message = str(refusal.value)
    assert "\n" not in message and "`llmcompressor`" in message and "nox -s llmc" in message
    assert sweep_main([f"method={method}", "bits=w4g64a16kv16", "budget=smoke"], multirun=True) == 2
    assert capsys.readouterr().err.strip() == f"error: {message}"


def test_the_loader_yields_our_windows_in_order_one_per_batch():
    model, _ = tiny_llama()
    windows = _windows(model)
    batches = list(llmc.calibration_loader(windows))
    assert len(batches) == len(windows)
    for batch, window in zip(batches, windows, strict=True):
        assert torch.equal(batch["input_ids"], window) and torch.equal(batch["attention_mask"], torch.ones_like(window))


def test_a_group_that_does_not_divide_an_input_width_is_refused_naming_one_that_does():
    model, _ = tiny_llama()  # input widths 64 and 192: g128 leaves 192 with half a group
    with pytest.raises(ValueError, match=r"input widths \[192\] are not multiples of 128; use g64 for this model"):
        llmc.check_group_divides(model, 128)
    llmc.check_group_divides(model, 64)
    llmc.check_group_divides(model, None)


def _run(method: str, bits: str, model, tokenizer, windows, **params):
    from methods import METHODS

    entry = METHODS[method]
    cfg = entry.make_config(f"method={method}", params)
    ctx = QuantContext(seed=0, calibration=lambda: windows, tokenizer=tokenizer)
    return entry.quantize(model, cfg, BitSpec.parse(bits), ctx)


@needs_library
def test_the_library_calibrates_on_exactly_our_windows():
    model, tokenizer = tiny_llama()
    windows = _windows(model)
    seen = []
    embed = model.model.embed_tokens
    hook = embed.register_forward_hook(
        lambda module, args, out: seen.append(args[0].clone()) if args[0].device.type != "meta" else None
    )
    _run("gptq_llmc", "w4g16a16kv16", model, tokenizer, windows)
    hook.remove()
    assert seen, "the library ran no forward pass on real data"
    first_pass = seen[: len(windows)]
    assert all(torch.equal(got, want) for got, want in zip(first_pass, windows, strict=True))
    assert all(any(torch.equal(got, want) for want in windows) for got in seen)


@needs_library
@pytest.mark.parametrize("bits,sym", [("w4g16a16kv16", False), ("w3a16kv16", False), ("w4g32a16kv16", True)])
def test_what_we_store_dequantizes_to_the_library_fake_quant(bits, sym, monkeypatch):
    """Checked on the library's own modules, before they are replaced; then every decoder linear is our QLinear
    holding those codes, and no module keeps the library's quantized forward."""
    model, tokenizer = tiny_llama()
    compared = []
    real = llmc.weight_from_library

    def checked(linear):
        stored = real(linear)
        expected = llmc.library_fake_quant(linear)
        torch.testing.assert_close(stored.dequantize(), expected.float(), rtol=0, atol=1e-6)
        assert stored.bits == int(bits[1]) and stored.sym == sym
        levels = stored.codes.float()
        assert levels.min() >= (-(2 ** (stored.bits - 1)) if sym else 0)
        assert levels.max() <= (2 ** (stored.bits - 1) - 1 if sym else 2**stored.bits - 1)
        compared.append(linear)
        return stored

    monkeypatch.setattr(llmc, "weight_from_library", checked)
    _run("gptq_llmc", bits, model, tokenizer, _windows(model), w_sym=sym)
    linears = list(llmc.decoder_linears(model))
    assert len(compared) == len(linears) == 14
    assert all(isinstance(linear, QLinear) and linear.qweight is not None for _, _, _, linear in linears)
    assert not any(hasattr(module, "quantization_scheme") for module in model.modules())


@needs_library
@pytest.mark.parametrize("build", [tiny_llama, tiny_gemma3])
def test_awq_smooths_the_norms_and_leaves_our_qlinears(build):
    model, tokenizer = build()
    norm = model.model.layers[0].input_layernorm.weight.detach().clone()
    _run("awq", "w3g16a16kv16", model, tokenizer, _windows(model))
    assert not torch.equal(model.model.layers[0].input_layernorm.weight, norm)  # the scales were folded in
    assert all(isinstance(linear, QLinear) for _, _, _, linear in llmc.decoder_linears(model))


@needs_library
def test_awq_refuses_a_ragged_group_before_calibrating():
    model, tokenizer = tiny_llama()
    with pytest.raises(UnsupportedBits, match="awq: llm-compressor quantizes whole groups only"):
        _run("awq", "w4g128a16kv16", model, tokenizer, [])


@needs_library
def test_bench_times_the_peer_and_ours_in_one_process_and_they_agree(capsys):
    """`bench quantize --method gptq_llmc --against gptq`: both timed on the same windows, the ratio printed; at the
    same settings the two GPTQs give the same PPL on the tiny model (within 1%: they differ only in whose code ran)."""
    from harness.bench import main as bench_main

    args = ["quantize", "--model", "tiny-llama", "--method", "gptq_llmc", "--against", "gptq"]
    args += ["--bits", "w4g16a16kv16", "--ppl-windows", "1", "calib.nsamples=4", "calib.seqlen=64"]
    assert bench_main(args) == 0
    out = capsys.readouterr().out
    ppls = [float(line.split(": ")[1]) for line in out.splitlines() if line.startswith("ppl: ")]
    assert len(ppls) == 2 and abs(ppls[0] / ppls[1] - 1) < 0.01
    assert "time ratio gptq / gptq_llmc: " in out


def test_smoothquant_refuses_weight_only_bits_and_gemma3_before_loading():
    from methods import smoothquant
    from methods.base import Request
    from methods.core.arch import ARCHS

    with pytest.raises(UnsupportedBits, match="quantize activations"):
        smoothquant.supports(Request(BitSpec.parse("w8a16kv16"), ARCHS["llama"]))
    with pytest.raises(UnsupportedBits, match="Gemma-3 with Llama's norm mappings"):
        smoothquant.supports(Request(BitSpec.parse("w8a8kv16"), ARCHS["gemma3"]))
    smoothquant.supports(Request(BitSpec.parse("w8a8kv16"), ARCHS["llama"]))


def _logit_error(model, before, ids) -> float:
    with torch.no_grad():
        after = model(ids).logits
    return float((after - before).norm() / before.norm())


@needs_library
@pytest.mark.parametrize("build,exact", [(tiny_llama, True), (tiny_gemma3, False)])
def test_the_library_smoothing_alone_is_exact_on_llama_and_not_on_gemma3(build, exact):
    """Why smoothquant refuses Gemma-3: the library's smoothing, with no quantization after it, should leave the FP
    model's logits unchanged; it does on Llama and does not on Gemma-3."""
    from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier

    model, tokenizer = build()
    windows = _windows(model, count=8, seqlen=64)
    ids = _windows(model, count=1, seqlen=64)[0]
    with torch.no_grad():
        before = model(ids).logits
    llmc.run_oneshot(model, windows, tokenizer, [SmoothQuantModifier(smoothing_strength=0.8)])
    error = _logit_error(model, before, ids)
    assert error < 1e-5 if exact else error > 0.1


@needs_library
@pytest.mark.parametrize("weights", ["gptq", "rtn"])
def test_smoothquant_stores_symmetric_per_channel_codes(weights):
    model, tokenizer = tiny_llama()
    norm = model.model.layers[0].input_layernorm.weight.detach().clone()
    _run("smoothquant", "w8a8kv16", model, tokenizer, _windows(model), weights=weights)
    assert not torch.equal(model.model.layers[0].input_layernorm.weight, norm)
    linears = [linear for _, _, _, linear in llmc.decoder_linears(model)]
    assert all(isinstance(linear, QLinear) and linear.qweight.sym and linear.qweight.bits == 8 for linear in linears)
    assert all(linear.qweight.group_size == linear.in_features for linear in linears)
