"""`python -m harness bench kernels`: each packed format's matmul against dense 16-bit and fp32 matmuls.

For every linear shape of the chosen models (SmolLM2-135M and Llama-2-7B by default), decode (1 token)
and prefill (2048 tokens): min / median / max over repetitions after a warm-up, in one process, with the
speedup = dense median / format median. CPU: a warmed-up `perf_counter` timer; W8A8 and W4A4 run on
`torch._int_mm` (int8 × int8 -> int32; CPUs have no int4 GEMM, so W4A4 moves int4 values in int8 lanes),
weight-only formats dequantize then matmul in bf16. CUDA (`--device cuda`): the Triton kernels, timed with
`triton.testing.do_bench`.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kernels import reference
from kernels.packing import PackedLinear
from methods.core.quantizers import WeightQuantizer

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


def _formats(x: torch.Tensor, weight: torch.Tensor, device: str) -> dict[str, Callable[[], object]]:
    w_bf16, x_bf16 = weight.to(torch.bfloat16), x.to(torch.bfloat16)
    packed = {
        "w4a4": PackedLinear.from_quantized(WeightQuantizer(4, None, sym=True).quantize(weight)),
        "w8a8": PackedLinear.from_quantized(WeightQuantizer(8, None, sym=True).quantize(weight)),
        "w4g128": PackedLinear.from_quantized(WeightQuantizer(4, 128).quantize(weight)),
        "w2g128": PackedLinear.from_quantized(WeightQuantizer(2, 128).quantize(weight)),
    }
    fmts: dict[str, Callable[[], object]] = {
        "fp32": lambda: x @ weight.T,
        "bf16": lambda: x_bf16 @ w_bf16.T,
    }
    if device == "cpu":
        int_weights = {k: reference.signed_codes(packed[k]) for k in ("w4a4", "w8a8")}
        for name, bits in (("w4a4", 4), ("w8a8", 8)):
            codes, scale = int_weights[name]
            fmts[name] = lambda c=codes, s=scale, b=bits: reference.int_matmul(
                *reference.quantize_per_token_sym(x, b), c, s
            )
        for name in ("w4g128", "w2g128"):
            fmts[name] = lambda p=packed[name]: reference.dequant_matmul(x_bf16, p)
    else:
        from kernels import triton_kernels as tk

        x16 = x.to(torch.float16)
        for name, bits in (("w4a4", 4), ("w8a8", 8)):
            fmts[name] = lambda p=packed[name], b=bits: tk.int_matmul(
                *reference.quantize_per_token_sym(x, b), p, block=(64, 64, 64)
            )
        for name in ("w4g128", "w2g128"):
            fmts[name] = lambda p=packed[name]: tk.dequant_matmul(x16, p, block=(64, 64, 64))
    return fmts


def run(models: list[str], tokens: list[int], reps: int, device: str = "cpu") -> list[Timing]:
    timer = _time_cpu if device == "cpu" else _time_cuda
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
        "| model | layer | tokens | format | min ms | median ms | max ms | speedup vs bf16 | vs fp32 |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    base = {(r.model, r.layer, r.tokens, r.fmt): r.median for r in results}
    for r in results:
        bf16 = base[(r.model, r.layer, r.tokens, "bf16")]
        fp32 = base[(r.model, r.layer, r.tokens, "fp32")]
        lines.append(
            f"| {r.model} | {r.layer} | {r.tokens} | {r.fmt} | {1e3 * min(r.times):.3f} | {1e3 * r.median:.3f} | "
            f"{1e3 * max(r.times):.3f} | {bf16 / r.median:.2f}x | {fp32 / r.median:.2f}x |"
        )
    return "\n".join(lines)
