"""Per-run latency evaluator: which formats have kernels, and what it measures."""

import pytest

from harness.evaluate import latency
from harness.spec import BitSpec, LatencySpec


@pytest.mark.parametrize(
    "bits, w_sym, expected",
    [
        ("w4a4kv4", True, "w4a4"),
        ("w2a4kv4", False, "w2a4-asym"),
        ("w8a8kv8", True, "w8a8"),
        ("w4g128a16kv16", False, "w4g128-asym"),
        ("w3g128a16kv16", False, "w3g128-asym"),
        ("w16a16kv16", False, None),  # the 16-bit baseline itself
        ("w16a4kv4", True, None),
        ("w4g128a4kv4", True, None),  # grouped weights with integer activations: no kernel here
        ("w1.58a16kv16", True, None),
        ("w5a16kv16", True, None),
    ],
)
def test_run_format(bits, w_sym, expected):
    fmt = latency.run_format(BitSpec.parse(bits), w_sym)
    assert (fmt.name if fmt else None) == expected


def test_block_shapes_of_tiny_llama(tiny):
    model, _ = tiny
    hidden, inter = model.config.hidden_size, model.config.intermediate_size
    kv = model.config.num_key_value_heads * (model.config.hidden_size // model.config.num_attention_heads)
    assert latency.block_shapes(model) == {
        (hidden, hidden): 2,
        (kv, hidden): 2,
        (inter, hidden): 2,
        (hidden, inter): 1,
    }


@pytest.mark.parametrize("bits, w_sym", [("w4a4kv4", True), ("w4g32a16kv16", False)])
def test_measure_reports_ratios_per_phase(tiny, bits, w_sym):
    model, _ = tiny
    fmt = latency.run_format(BitSpec.parse(bits), w_sym)
    metrics, tags = latency.measure(latency.block_shapes(model), fmt, LatencySpec(reps=3, tokens=(1, 64)))
    for phase in ("decode", "tokens64"):
        low, mid, high = (metrics[f"latency.{phase}.speedup{s}"] for s in ("_min", "", "_max"))
        assert 0 < low <= mid <= high
        assert metrics[f"latency.{phase}.dense_ms"] > 0 and metrics[f"latency.{phase}.kernel_ms"] > 0
    assert tags["latency.format"] == fmt.name and tags["latency.dense_dtype"] == "bfloat16"
