"""Per-run latency: the run's weight format executed by its kernel against the dense 16-bit matmul.

The kernel comes from the run's quantized weights themselves: every decoder linear's format object
(`methods.core.formats`) names the `KernelFormat` that executes it (`kernel_format(a_bits)`), or none — then
the run's latency is "no kernel", never another format's time. For every linear of one decoder block (all
blocks have the same shapes), at decode (1 token) and prefill (2048 tokens), the format's kernel call
(`qkernels.bench.kernel_call`: integer GEMM incl. per-token activation quantization, dequantize + matmul, or the
LUT GEMM) and the dense 16-bit matmul (bf16 on CPU, fp16 on CUDA)
are timed in the same process, `reps` times after a warm-up. For repetition r the block's total times are
summed over its linears, and speedup[r] = dense_total[r] / kernel_total[r]; we log its median, min and max.

What this measures and what it does not: the GEMMs of the decoder linears only — not attention, the
online Hadamard transforms, norms, embeddings or lm_head, and not KV-cache (de)quantization. Timings do
not depend on the weight values, so the weights are seeded random codes in the run's format (bits, group,
symmetry); that makes the measurement a function of (shapes, format, device) alone, which is
what lets `python -m harness bench runs` measure earlier runs the same way.
"""

from __future__ import annotations

import statistics
from collections import Counter

import torch

from harness.spec import BitSpec, LatencySpec
from methods.core.arch import arch_of, decoder_linears
from methods.core.formats import check_format
from qkernels import bench as kernel_bench
from qkernels.bench import KernelFormat

NO_KERNEL = "none"


def model_format(model: torch.nn.Module, a_bits: int) -> KernelFormat | str | None:
    """The kernel format of a quantized model's decoder linears: a `KernelFormat` when every quantized linear
    runs on the same kernel, `NO_KERNEL` when some format has none (or they differ), None when no linear is
    quantized (the 16-bit baseline itself). An unknown format object raises `UnknownFormat`."""
    found = set()
    for _, _, _, module in decoder_linears(model):
        qweight = getattr(module, "qweight", None)
        if qweight is not None:
            found.add(check_format(qweight).kernel_format(a_bits))
    if not found:
        return None
    return found.pop() if len(found) == 1 and None not in found else NO_KERNEL


def run_format(bits: BitSpec, w_sym: bool) -> KernelFormat | None:
    """The kernel format of a uniform-integer run from its bit setting. Only for runs logged before per-run
    latency existed (`bench runs`): every such run is a uniform-integer format; new runs ask `model_format`."""
    if bits.w not in (2, 3, 4, 8):
        return None
    return kernel_bench.kernel_format(int(bits.w), bits.a, bits.group, w_sym)


def phase_name(tokens: int) -> str:
    return {1: "decode", 2048: "prefill"}.get(tokens, f"tokens{tokens}")


def block_shapes(model: torch.nn.Module) -> Counter:
    """(out_features, in_features) -> count over the first decoder block's linears."""
    arch = arch_of(model)
    block = arch.layers(model)[0]
    return Counter(tuple(getattr(parent, attr).weight.shape) for parent, attr in arch.block_linears(block).values())


def measure(shapes: Counter, fmt: KernelFormat, spec: LatencySpec) -> tuple[dict[str, float], dict[str, str]]:
    """Metrics `latency.<phase>.{speedup,speedup_min,speedup_max,dense_ms,kernel_ms}` and descriptive tags."""
    timer = kernel_bench.timer_for(spec.device)
    dtype = kernel_bench.dense_dtype(spec.device)
    gen = torch.Generator().manual_seed(0)
    metrics: dict[str, float] = {}
    for tokens in spec.tokens:
        dense_total = [0.0] * spec.reps
        kernel_total = [0.0] * spec.reps
        for (out_f, in_f), count in sorted(shapes.items()):
            weight = torch.randn(out_f, in_f, generator=gen) * 0.02
            x = torch.randn(tokens, in_f, generator=gen).to(spec.device)
            w16, x16 = weight.to(spec.device, dtype), x.to(dtype)
            kernel = kernel_bench.kernel_call(fmt, x, kernel_bench.pack_on(fmt, weight, spec.device), spec.device)
            dense_times = timer(lambda w16=w16, x16=x16: x16 @ w16.T, spec.reps)
            kernel_times = timer(kernel, spec.reps)
            for r in range(spec.reps):
                dense_total[r] += count * dense_times[r]
                kernel_total[r] += count * kernel_times[r]
        ratios = [d / k for d, k in zip(dense_total, kernel_total, strict=True)]
        phase = phase_name(tokens)
        metrics |= {
            f"latency.{phase}.speedup": statistics.median(ratios),
            f"latency.{phase}.speedup_min": min(ratios),
            f"latency.{phase}.speedup_max": max(ratios),
            f"latency.{phase}.dense_ms": 1e3 * statistics.median(dense_total),
            f"latency.{phase}.kernel_ms": 1e3 * statistics.median(kernel_total),
        }
    tags = {
        "latency.format": fmt.name,
        "latency.device": spec.device,
        "latency.hardware": kernel_bench.hardware_name(spec.device),
        "latency.dense_dtype": str(dtype).removeprefix("torch."),
        "latency.threads": str(torch.get_num_threads()),
        "latency.scope": "decoder-block linears (GEMM + activation quantization)",
    }
    return metrics, tags
