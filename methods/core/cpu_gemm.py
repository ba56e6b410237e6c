"""Which library multiplies fp32 matrices on CPU: PyTorch's default (MKL's sgemm) or oneDNN's inner product.

PyTorch's CPU wheels call MKL for every fp32 `linear`/`matmul`; they also carry oneDNN, which picks its kernels by
CPU features. On this project's 2-core AMD EPYC, MKL's sgemm measured 1.2-3x slower than oneDNN on SmolLM2's
linear shapes (MKL is tuned for Intel CPUs); `python -m harness bench gemm` measures both on a model
(DEVELOPERS.md has the numbers). The libraries sum in different orders, so an FP forward agrees to fp32 rounding
(~1e-7 relative in PPL), not bit for bit; behind a fake quantizer such a difference can move a value across a
rounding boundary, so quantized runs agree only statistically (the bench prints the PPL drift).

`use_cpu_gemm("onednn")` is a context manager that routes `torch.nn.functional.linear` on fp32 CPU tensors to
oneDNN while no gradient is being taken (evaluation, calibration forwards, Hessian accumulation), and also
where a gradient flows only to the input through a frozen weight (SpinQuant learning rotations of a frozen
network): forward and the input gradient (grad_out · W) both on oneDNN. Anything else (a weight or bias that
trains, other dtypes, CUDA, fewer than `MIN_ROWS` rows as in decoding, a graph torch.compile is tracing) goes to
PyTorch's own `linear`. It is a `TorchFunctionMode`, so module hooks, `QLinear` and Hugging Face models need no
change.
`use_cpu_gemm("mkl")` changes nothing.
"""

from __future__ import annotations

import contextlib
import threading

import torch
from torch.overrides import TorchFunctionMode

CPU_GEMMS = ("onednn", "mkl")
# Below this many rows (tokens) oneDNN's per-call weight reorder dominates: at 1 row it is 2-10x slower than MKL
# for SmolLM2's 576x1536 / 1536x576 weights, at 8 rows even, at 32 rows 1.5-1.9x faster (2-core AMD EPYC,
# 2 threads).
MIN_ROWS = 16
_POINTWISE = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() else None


def _eligible(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    if x.dtype != torch.float32 or weight.dtype != torch.float32 or x.device.type != "cpu":
        return False
    if x.dim() < 2 or x.numel() < MIN_ROWS * x.shape[-1] or weight.dim() != 2:
        return False
    trains = weight.requires_grad or (bias is not None and bias.requires_grad)
    return not (torch.is_grad_enabled() and trains)


class _FrozenWeightLinear(torch.autograd.Function):
    """`linear(x, weight, bias)` with a gradient for x only (weight and bias frozen), both directions on oneDNN:
    d x = d out · weight, i.e. a linear with weightᵀ."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(weight)
        return onednn_linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        (weight,) = ctx.saved_tensors
        return onednn_linear(grad_out, weight.t()), None, None


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` computed by oneDNN's fp32 inner product (x: [..., in], weight: [out, in]).
    `torch.ops.mkldnn._linear_pointwise` (the op torch.compile's CPU backend lowers linears to) takes dense
    tensors; where a build lacks it, `mkldnn_linear` on oneDNN-layout copies (measured ~2x slower here)."""
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    weight = weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    if _POINTWISE is not None:
        out = _POINTWISE(rows, weight, bias, "none", [], "")
    else:
        out = torch._C._nn.mkldnn_linear(rows.to_mkldnn(), weight, bias).to_dense()
    return out.reshape(*x.shape[:-1], weight.shape[0])


class _OneDNNLinears(TorchFunctionMode):
    def __enter__(self):
        _ACTIVE.depth = getattr(_ACTIVE, "depth", 0) + 1
        return super().__enter__()

    def __exit__(self, *exc):
        _ACTIVE.depth -= 1
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # Inside a graph torch.compile traces (auto-round compiles each block it tunes), the compiler picks the
        # kernels: its CPU lowering takes `_linear_pointwise` only with a constant weight and fails on a traced one.
        if func is torch.nn.functional.linear and not torch.compiler.is_compiling():
            x = args[0] if args else kwargs["input"]
            weight = args[1] if len(args) > 1 else kwargs["weight"]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if isinstance(x, torch.Tensor) and _eligible(x, weight, bias):
                if torch.is_grad_enabled() and x.requires_grad:
                    return _FrozenWeightLinear.apply(x, weight, bias)
                return onednn_linear(x, weight, bias)
        return func(*args, **kwargs)


_ACTIVE = threading.local()  # how many `use_cpu_gemm("onednn")` blocks this thread is inside


def current_cpu_gemm() -> str:
    """The library fp32 CPU linears go to here and now: "onednn" inside `use_cpu_gemm("onednn")`, else "mkl"."""
    return "onednn" if getattr(_ACTIVE, "depth", 0) > 0 else "mkl"


def checkpoint_contexts() -> tuple:
    """`context_fn` for `torch.utils.checkpoint`: the backward pass recomputes a checkpointed function outside
    the `use_cpu_gemm` block it ran in, so the recomputation re-enters the library of the forward (otherwise its
    linears go to another library, save other tensors, and checkpoint's metadata check fails)."""
    return contextlib.nullcontext(), use_cpu_gemm(current_cpu_gemm())


def gram(x: torch.Tensor) -> torch.Tensor:
    """xᵀx for x [tokens, features], written as `linear(xᵀ, xᵀ)` so that `use_cpu_gemm` routes it too."""
    xt = x.T
    return torch.nn.functional.linear(xt, xt)


def use_cpu_gemm(name: str):
    """Context manager: fp32 CPU linears on `name` ("onednn" or "mkl", PyTorch's default)."""
    if name not in CPU_GEMMS:
        raise ValueError(f"cpu_gemm must be one of {', '.join(CPU_GEMMS)}, got {name!r}")
    if name == "mkl":
        return contextlib.nullcontext()
    return _OneDNNLinears()
