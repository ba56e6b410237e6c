"""`python -m harness bench kernels`: each packed format's matmul against dense 16-bit and fp32 matmuls.

For every linear shape of the chosen models (SmolLM2-135M and Llama-2-7B by default), decode (1 token)
and prefill (2048 tokens): min / median / max over repetitions after a warm-up, in one process, with the
speedup = dense median / format median; "16-bit" is bf16 on CPU and fp16 on CUDA. CPU: a warmed-up
`perf_counter` timer; W8A8 and W4A4 run on `torch._int_mm` (int8 × int8 -> int32; CPUs have no int4 GEMM,
so W4A4 moves int4 values in int8 lanes), weight-only formats dequantize then matmul in bf16 (the reference
path), and `w4g128-int4pack` / `w8-int8pack` run PyTorch's packed CPU kernels (deployed mode's path). CUDA
(`--device cuda`): the Triton kernels, timed with `triton.testing.do_bench`.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from qkernels import reference
from qkernels.packing import PackedLinear, PackedLUTLinear

MODEL_SHAPES = {  # (name, out_features, in_features) of the decoder linears
    "smollm2-135m": [
        ("q/o_proj", 576, 576),
        ("k/v_proj", 192, 576),
        ("gate/up_proj", 1536, 576),
        ("down_proj", 576, 1536),
    ],
    "llama-2-7b": [("q/k/v/o_proj", 4096, 4096), ("gate/up_proj", 11008, 4096), ("down_proj", 4096, 11008)],
}


@dataclass(frozen=True)
class Timing:
    model: str
    layer: str
    tokens: int
    fmt: str
    times: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def _time_cpu(fn: Callable[[], object], reps: int) -> tuple[float, ...]:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return tuple(times)


def _time_cuda(fn: Callable[[], object], reps: int) -> tuple[float, ...]:
    from triton.testing import do_bench

    times_ms = do_bench(fn, rep=50, return_mode="all")  # milliseconds
    return tuple(t / 1e3 for t in times_ms[:reps])


@dataclass(frozen=True)
class KernelFormat:
    """A weight format the kernels execute. `kind="int"`: integer GEMM when `a_bits` is set (per-channel
    weights, per-token symmetric activations), else the weight-only dequantize-then-matmul GEMM.
    `kind="lut"`: 2-bit codes into per-(row, group) level tables: weight-only (`lut_matmul`), or with
    per-token symmetric integer activations when `a_bits` is set (`lut_matmul_a`, RCP's W2A4)."""

    w_bits: int
    group_size: int | None  # None = one group per output channel
    w_sym: bool
    a_bits: int | None = None
    kind: str = "int"

    @property
    def name(self) -> str:
        acts = f"a{self.a_bits}" if self.a_bits else ""
        group = f"g{self.group_size}" if self.group_size else ""
        if self.kind == "lut":
            return f"lut{self.w_bits}{group}{acts}"
        return f"w{self.w_bits}{group}{acts}" + ("" if self.w_sym else "-asym")


BENCH_FORMATS = (
    KernelFormat(4, None, True, 4),
    KernelFormat(8, None, True, 8),
    KernelFormat(4, 128, False),
    KernelFormat(2, 128, False),
    KernelFormat(2, None, False, 4, kind="lut"),  # RCP's W2A4: one learned 4-level table per row
)


def kernel_format(w_bits: int, a_bits: int, group_size: int | None, w_sym: bool) -> KernelFormat | None:
    """The kernel format that executes a bit setting, or None (16-bit weights are the baseline itself;
    group-wise weights with quantized activations and non-packable widths have no kernel here)."""
    if w_bits >= 16 or w_bits not in (2, 3, 4, 8):
        return None
    if a_bits >= 16:
        return KernelFormat(w_bits, group_size, w_sym)
    if a_bits <= 8 and group_size is None:
        return KernelFormat(w_bits, None, w_sym, a_bits)
    return None


def dense_dtype(device: str) -> torch.dtype:
    """The 16-bit baseline: bf16 on CPU (fast with AMX/AVX512-bf16, emulated without: see `hardware_name`),
    fp16 on CUDA."""
    return torch.bfloat16 if device == "cpu" else torch.float16


# Widest instruction set a CPU has for the bf16 baseline, best first (x86 flags, then aarch64 features): a CPU
# without AMX/AVX512 runs bf16 GEMMs emulated, many times slower, so every ratio against bf16 changes with it.
CPU_ISA_ORDER = ("amx_bf16", "avx512_bf16", "avx512f", "avx2", "bf16", "asimd")


def hardware_name(device: str, cpuinfo: str | None = None) -> str:
    """What executed the timings: the GPU's name, or the CPU's model name and its widest `CPU_ISA_ORDER` entry,
    e.g. "AMD EPYC (avx2)". `cpuinfo`: the text of /proc/cpuinfo (read when None; absent off Linux)."""
    if device != "cpu":
        return torch.cuda.get_device_name(torch.device(device))
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as f:
                cpuinfo = f.read()
        except OSError:
            cpuinfo = ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip().lower(), value.strip())
    name = fields.get("model name") or platform.processor() or platform.machine() or "unknown CPU"
    flags = set((fields.get("flags") or fields.get("features") or "").split())
    isa = next((flag for flag in CPU_ISA_ORDER if flag in flags), "no avx2")
    return f"{name} ({isa})"


def kernel_call(fmt: KernelFormat, x: torch.Tensor, packed, device: str) -> Callable[[], object]:
    """The timed call for `fmt` on activations x (fp32 [tokens, in]). CPU: `torch._int_mm` on int8 lanes
    (unpacked once, the CPU deployment layout) for integer formats, dequantize + bf16 matmul otherwise.
    CUDA: the Triton kernels on the packed words."""
    if fmt.kind == "lut" and fmt.a_bits:
        if device == "cpu":
            return lambda: reference.lut_matmul_a(*reference.quantize_per_token_sym(x, fmt.a_bits), packed)
        from qkernels import triton_kernels as tk

        return lambda: tk.lut_matmul_a(*reference.quantize_per_token_sym(x, fmt.a_bits), packed)
    if fmt.kind == "lut":
        x16 = x.to(dense_dtype(device))
        if device == "cpu":
            return lambda: reference.lut_matmul(x16, packed)
        from qkernels import triton_kernels as tk

        return lambda: tk.lut_matmul(x16, packed)
    if device == "cpu":
        if fmt.a_bits:
            w_codes, w_scale, w_zero = reference.integer_weight(packed)
            return lambda: reference.int_matmul(
                *reference.quantize_per_token_sym(x, fmt.a_bits), w_codes, w_scale, w_zero
            )
        x16 = x.to(dense_dtype(device))
        return lambda: reference.dequant_matmul(x16, packed)
    from qkernels import triton_kernels as tk

    if fmt.a_bits:
        return lambda: tk.int_matmul(*reference.quantize_per_token_sym(x, fmt.a_bits), packed, block=(64, 64, 64))
    x16 = x.to(dense_dtype(device))
    return lambda: tk.dequant_matmul(x16, packed, block=(64, 64, 64))


def pack_on(fmt: KernelFormat, weight: torch.Tensor, device: str) -> PackedLinear | PackedLUTLinear:
    """A packed weight of `fmt` with `weight`'s shape. Kernel time does not depend on the values, so codes are
    seeded random ones with scales of the weight's magnitude (no quantizer needed)."""
    rows, cols = weight.shape
    group = fmt.group_size or cols
    n_groups = -(-cols // group)
    gen = torch.Generator().manual_seed(rows * 7919 + cols)
    codes = torch.randint(0, 2**fmt.w_bits, (rows, cols), generator=gen).to(torch.uint8)
    if fmt.kind == "lut":
        levels = torch.randn(rows, n_groups, 2**fmt.w_bits, generator=gen).sort(dim=-1).values * 0.02
        packed = PackedLUTLinear.pack(codes, levels, group)
        packed.words, packed.levels = packed.words.to(device), packed.levels.to(device)
        return packed
    scales = torch.full((rows, n_groups), 0.02 / 2 ** (fmt.w_bits - 1))
    zeros = torch.full((rows, n_groups), float(2 ** (fmt.w_bits - 1)))
    packed = PackedLinear.pack(codes, scales, zeros, fmt.w_bits, group, fmt.w_sym)
    for name in ("words", "scales", "zero_words"):
        setattr(packed, name, getattr(packed, name).to(device))
    return packed


@dataclass(frozen=True)
class RandomGrid:
    """Seeded random codes with constant scales and zeros on `weight`'s shape: the fields the packed CPU weights
    read from a quantized weight (`from_quantized`). Kernel time does not depend on the values (as `pack_on`)."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bits: int
    sym: bool
    group_size: int

    @classmethod
    def like(cls, weight: torch.Tensor, bits: int, group_size: int | None, sym: bool) -> RandomGrid:
        rows, cols = weight.shape
        group = group_size or cols
        n_groups = -(-cols // group)
        gen = torch.Generator().manual_seed(rows * 7919 + cols + bits)
        lo = -(2 ** (bits - 1)) if sym else 0
        codes = torch.randint(lo, lo + 2**bits, (rows, cols), generator=gen).to(torch.int8 if sym else torch.uint8)
        scales = torch.full((rows, n_groups), 0.02 / 2 ** (bits - 1))
        zeros = torch.zeros(rows, n_groups) if sym else torch.full((rows, n_groups), float(2 ** (bits - 1)))
        return cls(codes, scales, zeros, bits, sym, group)


def _cpu_packed(x: torch.Tensor, weight: torch.Tensor) -> dict[str, Callable[[], object]]:
    """PyTorch's packed CPU kernels (deployed mode's weight-only path, `qkernels.cpu_packed`), bf16 activations:
    int4 g128 asymmetric and int8 per-channel symmetric, on seeded random codes of the weight's shape."""
    from qkernels.cpu_packed import Int4CPUWeight, Int8CPUWeight

    x16 = x.to(torch.bfloat16)
    calls = {}
    int4 = Int4CPUWeight.from_quantized(RandomGrid.like(weight, 4, 128, sym=False))
    if int4 is not None:
        calls["w4g128-int4pack"] = lambda: int4.matmul(x16)
    int8 = Int8CPUWeight.from_quantized(RandomGrid.like(weight, 8, None, sym=True))
    calls["w8-int8pack"] = lambda: int8.matmul(x16)
    return calls


def _formats(x: torch.Tensor, weight: torch.Tensor, device: str) -> dict[str, Callable[[], object]]:
    w16, x16 = weight.to(dense_dtype(device)), x.to(dense_dtype(device))
    fmts: dict[str, Callable[[], object]] = {"fp32": lambda: x @ weight.T, "16-bit": lambda: x16 @ w16.T}
    for fmt in BENCH_FORMATS:
        fmts[fmt.name] = kernel_call(fmt, x, pack_on(fmt, weight, device), device)
    if device == "cpu":
        fmts.update(_cpu_packed(x, weight))
    return fmts


def timer_for(device: str) -> Callable[[Callable[[], object], int], tuple[float, ...]]:
    return _time_cpu if device == "cpu" else _time_cuda


def run(models: list[str], tokens: list[int], reps: int, device: str = "cpu") -> list[Timing]:
    timer = timer_for(device)
    gen = torch.Generator().manual_seed(0)
    results = []
    for model in models:
        for layer, out_f, in_f in MODEL_SHAPES[model]:
            weight = (torch.randn(out_f, in_f, generator=gen) * 0.02).to(device)
            for m in tokens:
                x = torch.randn(m, in_f, generator=gen).to(device)
                for fmt, fn in _formats(x, weight, device).items():
                    results.append(Timing(model, layer, m, fmt, timer(fn, reps)))
    return results


def table(results: list[Timing]) -> str:
    lines = [
        "| model | layer | tokens | format | min ms | median ms | max ms | speedup vs 16-bit | vs fp32 |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    base = {(r.model, r.layer, r.tokens, r.fmt): r.median for r in results}
    for r in results:
        bf16 = base[(r.model, r.layer, r.tokens, "16-bit")]
        fp32 = base[(r.model, r.layer, r.tokens, "fp32")]
        lines.append(
            f"| {r.model} | {r.layer} | {r.tokens} | {r.fmt} | {1e3 * min(r.times):.3f} | {1e3 * r.median:.3f} | "
            f"{1e3 * max(r.times):.3f} | {bf16 / r.median:.2f}x | {fp32 / r.median:.2f}x |"
        )
    return "\n".join(lines)
