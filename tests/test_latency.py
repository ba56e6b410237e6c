"""Per-run latency evaluator: which formats have kernels, and what it measures."""

import pytest

from harness.evaluate import latency
from harness.spec import BitSpec, LatencySpec
from qkernels.bench import hardware_name


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
    assert tags["latency.hardware"] == hardware_name("cpu")


X86_AMX = "model name\t: Intel(R) Xeon(R) Platinum 8480+\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16\n"
X86_AVX2 = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse4_2 avx avx2\nprocessor\t: 1\n"
ARM = "processor\t: 0\nFeatures\t: fp asimd crc32\nCPU implementer\t: 0x41\n"


def test_hardware_name_says_whether_the_cpu_has_a_native_bf16_gemm():
    assert hardware_name("cpu", X86_AMX) == "Intel(R) Xeon(R) Platinum 8480+ (amx_bf16)"
    assert hardware_name("cpu", X86_AVX2) == "AMD EPYC (avx2)"
    assert hardware_name("cpu", ARM).endswith(" (asimd)")  # no model name line: the machine type names it
    assert hardware_name("cpu", "").endswith(" (no avx2)")
