"""Method conformance: what every registered method and act/KV plug-in must do, on both model families.

A new method adds its module, its YAML, its own tests and one registry line; this suite then checks the rest,
for every method in `METHODS` × {tiny-llama, tiny-gemma3}, composed exactly as a run composes it (Hydra config
→ RunSpec → method + act/KV plug-ins through `runner.apply`):

* its YAML composes into its config dataclass, and the registries and `conf/` name the same things;
* `supports` decides before any model loads (the loader is made to fail), refusing with one line;
* quantization runs and leaves finite logits that differ from FP's;
* every quantized decoder linear holds a known format, the memory report's bits are the formats' own
  `storage_bits()` (and the packed bytes their packers' bytes), the KV bytes are the KV plug-in's;
* the latency column uses the formats' own kernel, or "no kernel" — never another format's;
* the act/KV plug-ins the bits ask for are attached;
* the same seed gives the same logits.
"""

from __future__ import annotations

import importlib.util
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from harness import models
from harness.cli_sweep import CONF_DIR
from harness.evaluate import latency
from harness.evaluate.memory import memory_report
from harness.runner import PLUGINS, apply, check_supported, make_context, spec_from_config
from methods import METHODS
from methods.act import ACT_QUANTIZERS
from methods.base import UnsupportedBits
from methods.core.arch import decoder_linears
from methods.core.attention import attention_states
from methods.core.formats import check_format
from methods.core.qlinear import QLinear
from methods.kv import KV_QUANTIZERS

FAMILIES = ("tiny-llama", "tiny-gemma3")
# Each method runs the first of these it supports: weights, activations and KV cache all quantized where it can
# (g16 divides every tiny linear's width), else weight-only per channel with a quantized KV cache.
BIT_CHOICES = ("w4g16a4kv4", "w4a16kv4", "w2a16kv4")
PROBE_BITS = ("w16a16kv16", "w8a8kv8", "w4g32a16kv16", "w3a4kv4", "w2g64a16kv4", "w1.58a16kv16", "w1a16kv16")


def _with_library(method: str, *rest):
    """The case, skipped where the method is a peer whose library this environment lacks (its nox session has it)."""
    required, environment = METHODS[method].requires, METHODS[method].environment
    if required is None or importlib.util.find_spec(required) is not None:
        return pytest.param(method, *rest)
    return pytest.param(
        method, *rest, marks=pytest.mark.skip(reason=f"needs the `{required}` package (nox -s {environment})")
    )


CASES = [_with_library(method, model) for method in METHODS for model in FAMILIES]
METHOD_CASES = [_with_library(method) for method in METHODS]
# The module fixture quantizes each case once; one pytest-xdist worker runs the whole suite so it is built once.
pytestmark = pytest.mark.xdist_group("conformance")


def _spec(method: str, model: str, bits: str, extra: tuple[str, ...] = ()):
    overrides = [f"method={method}", f"model={model}", f"bits={bits}", "budget=smoke", "calib.seqlen=64", *extra]
    overrides += ["train.windows=4", "train.seqlen=32"] if METHODS[method].trains else []  # + smoke cuts
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return spec_from_config(compose("config", overrides=overrides))


def _first_supported(method: str, model: str):
    """The spec of the first bit setting the method supports, or its refusal of the last one."""
    for bits in BIT_CHOICES:
        spec = _spec(method, model, bits)
        try:
            check_supported(spec)
            return spec
        except UnsupportedBits as refusal:
            last = refusal
    return last


def _ids():
    return torch.arange(160).reshape(2, 80) % 250


def _quantize(spec, data_dir: str, checkpoints):
    """A fresh model of the spec, quantized by the method and its plug-ins; (model, method summary, kv)."""
    model, tokenizer = models.load(spec.model)
    entry = METHODS[spec.method]
    ctx = make_context(replace(spec, data_dir=data_dir), tokenizer)
    ctx.checkpoint_dir = ctx.cache_dir = str(checkpoints)
    kv = ctx.kv
    torch.manual_seed(spec.seed)
    summary = apply(model, entry, entry.make_config(spec.method, spec.method_params), spec.bits, ctx)
    return model, summary, kv


@pytest.fixture(scope="module")
def quantized(data_dir, tmp_path_factory):
    """(method, model) -> (spec, quantized model, kv plug-in, logits), or the refusal; built once per case."""
    cache = {}

    def get(method: str, model: str):
        if (method, model) not in cache:
            spec = _first_supported(method, model)
            if isinstance(spec, UnsupportedBits):
                cache[method, model] = spec
                return spec
            qmodel, _, kv = _quantize(spec, data_dir, tmp_path_factory.mktemp("checkpoints"))
            with torch.no_grad():
                logits = qmodel(_ids()).logits
            cache[method, model] = (spec, qmodel, kv, logits)
        return cache[method, model]

    return get


def _case(quantized, method, model):
    case = quantized(method, model)
    if isinstance(case, UnsupportedBits):
        pytest.skip(f"{method} refuses {model}: {case}")
    return case


def test_registries_match_the_config_groups():
    for group, registry in {"method": METHODS, **PLUGINS}.items():
        assert {p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml")} == set(registry), group


@pytest.mark.parametrize("group", ["method", "act", "kv"])
def test_each_yaml_instantiates_its_dataclass(group):
    registry = {"method": METHODS, **PLUGINS}[group]
    for name, entry in registry.items():
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("config", overrides=[f"{group}={name}"])
        params = {k: v for k, v in cfg[group].items() if k != "name"}
        config = entry.make_config(f"{group} {name!r}", params)
        assert isinstance(config, entry.config_cls) and cfg[group].name == name
        with pytest.raises(ValueError, match="has no parameter"):
            entry.make_config(f"{group} {name!r}", {**params, "no_such_parameter": 1})


@pytest.mark.parametrize("method", METHOD_CASES)
def test_supports_decides_before_any_model_loads(method, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("supports() must not load a model")

    monkeypatch.setattr(models, "load", no_loading)
    refused = 0
    for model in FAMILIES:
        for bits in PROBE_BITS + BIT_CHOICES:
            try:
                check_supported(_spec(method, model, bits))
            except UnsupportedBits as refusal:
                message = str(refusal)
                assert message and "\n" not in message and method in message, message
                refused += 1
    assert refused < len(FAMILIES) * (len(PROBE_BITS) + len(BIT_CHOICES)), f"{method} refuses every setting"


@pytest.mark.parametrize(("method", "model"), CASES)
def test_quantizes_to_finite_changed_logits(method, model, quantized, tiny):
    spec, qmodel, _, logits = _case(quantized, method, model)
    fp, _ = models.load(spec.model)
    with torch.no_grad():
        reference = fp(_ids()).logits
    assert torch.isfinite(logits).all()
    assert not torch.equal(logits, reference)


@pytest.mark.parametrize(("method", "model"), CASES)
def test_memory_counts_the_formats_own_bits(method, model, quantized):
    spec, qmodel, kv, _ = _case(quantized, method, model)
    linears = [module for _, _, _, module in decoder_linears(qmodel)]
    assert all(isinstance(m, QLinear) and m.qweight is not None for m in linears), "every decoder linear quantized"
    formats = [check_format(m.qweight) for m in linears]
    report = memory_report(qmodel, kv.bytes_per_token(qmodel))
    stored = sum(f.storage_bits() for f in formats)
    assert report.quantized_weights == sum(m.weight.numel() for m in linears)
    assert report.quantized_bits_per_weight * report.quantized_weights == pytest.approx(stored, rel=1e-12)
    assert report.quantized_bits_per_weight < 16
    packed = [f.pack() for f in formats]
    if all(p is not None for p in packed):
        assert report.packed_bits_per_weight * report.quantized_weights == pytest.approx(
            8 * sum(p.nbytes() for p in packed), rel=1e-12
        )
    else:
        assert report.packed_bits_per_weight is None
    assert report.kv_bytes_per_token == kv.bytes_per_token(qmodel) < memory_report(qmodel).kv_bytes_per_token


@pytest.mark.parametrize(("method", "model"), CASES)
def test_latency_uses_the_formats_own_kernel_or_none(method, model, quantized):
    spec, qmodel, _, _ = _case(quantized, method, model)
    kernels = {check_format(m.qweight).kernel_format(spec.bits.a) for _, _, _, m in decoder_linears(qmodel)}
    expected = kernels.pop() if len(kernels) == 1 and None not in kernels else latency.NO_KERNEL
    assert latency.model_format(qmodel, spec.bits.a) == expected


@pytest.mark.parametrize(("method", "model"), CASES)
def test_the_plugins_the_bits_ask_for_are_attached(method, model, quantized):
    spec, qmodel, _, _ = _case(quantized, method, model)
    for _, _, _, m in decoder_linears(qmodel):
        assert (m.act_quant.bits == spec.bits.a) if spec.bits.quantizes_activations else m.act_quant is None
    states = attention_states(qmodel)
    assert all(s.key_quant is not None and s.value_quant is not None for s in states)


@pytest.mark.parametrize(("method", "model"), CASES)
def test_same_seed_same_logits(method, model, quantized, data_dir, tmp_path):
    spec, _, _, logits = _case(quantized, method, model)
    again, _, _ = _quantize(spec, data_dir, tmp_path)
    with torch.no_grad():
        assert torch.equal(again(_ids()).logits, logits)


@pytest.mark.parametrize("model", FAMILIES)
@pytest.mark.parametrize("plugin", list(KV_QUANTIZERS))
def test_every_kv_plugin_composes_with_a_weight_method(plugin, model, data_dir, tmp_path):
    """Each KV plug-in under a weight method, as a run composes it: attached at its key placement on every
    block, finite logits that differ from the weight-only model's, and its own bytes per token, below 16-bit."""
    spec = _spec("rtn", model, "w4g16a16kv4", (f"kv={plugin}",))
    check_supported(spec)
    qmodel, _, kv = _quantize(spec, data_dir, tmp_path)
    assert type(kv) is type(KV_QUANTIZERS[plugin].build(KV_QUANTIZERS[plugin].config_cls(), 4))
    states = attention_states(qmodel)
    assert all(s.key_quant is not None and s.keys_pre_rope == kv.keys_pre_rope for s in states)
    with torch.no_grad():
        logits = qmodel(_ids()).logits
        for s in states:
            s.set_kv(None, None, False)
        weight_only = qmodel(_ids()).logits
    assert torch.isfinite(logits).all() and not torch.equal(logits, weight_only)
    report = memory_report(qmodel, kv.bytes_per_token(qmodel))
    assert 0 < report.kv_bytes_per_token < memory_report(qmodel).kv_bytes_per_token


@pytest.mark.parametrize("model", FAMILIES)
@pytest.mark.parametrize("plugin", list(ACT_QUANTIZERS))
def test_every_act_plugin_composes_with_a_weight_method(plugin, model, data_dir, tmp_path):
    """Each activation plug-in under a weight method it does not belong to: fitted if it needs data, then
    attached to every decoder linear, with finite logits that differ from the weight-only model's."""
    spec = _spec("rtn", model, "w4g16a4kv16", (f"act={plugin}",))
    check_supported(spec)
    qmodel, _, _ = _quantize(spec, data_dir, tmp_path)
    linears = [m for _, _, _, m in decoder_linears(qmodel)]
    assert all(isinstance(m, QLinear) and m.act_quant is not None for m in linears)
    with torch.no_grad():
        logits = qmodel(_ids()).logits
        for m in linears:
            m.act_quant = None
        weight_only = qmodel(_ids()).logits
    assert torch.isfinite(logits).all() and not torch.equal(logits, weight_only)
