"""Deployed mode (`eval=deploy`): the quantized model run on packed weights and real kernels, checked and timed.

1. `deploy(model)`: every fake-quant decoder linear whose format a kernel runs is replaced by a
   `DeployedLinear` holding only the packed weight (`qkernels.cpu_packed`: PyTorch's int4/int8 packed CPU
   kernels for weight-only formats, the integer GEMM for per-channel weights with per-token symmetric
   activations); the rest of the model is cast to bf16, the dtype those kernels are fast in. A linear with no
   kernel (LUT, ternary, group-wise weights with quantized activations, asymmetric activations...) keeps its
   fake-quant path and is counted: the run reports how many linears ran on a kernel.
2. The check, two parts. (a) Per linear: on the first window, every deployed linear's kernel output is compared with
   its fake-quant linear evaluated in fp32 on the same input (the fake-quant activation quantizer, the dequantized
   weight); the error is counted in bf16 units in the last place (ulps) of the reference, with a floor of 2^-16 ·
   (|x̂| @ |Ŵ|ᵀ) for fp32 accumulation error under cancellation. An integer-GEMM kernel (W4A4, W8A8...) does exact
   integer arithmetic, so it must land within `linear_ulps` (1) of the reference (measured ≤ 0.50): a scale 1% off
   misses by 3.5 ulps, a wrong zero offset or activation clip by thousands. (b) Whole model: perplexity on the first
   `windows` windows against the fake-quant model evaluated in the same dtype (bf16), within `tolerance` (0.1%). For
   weight-only formats (a) is logged and (b) fails the run. For formats that quantize activations (b) is logged and
   only (a) fails the run, because their end-to-end PPL is not reproducible to 0.1% by *any* two correct
   implementations: a one-ulp difference in a layer's output moves an activation across a rounding boundary, the
   flipped code changes that layer's output, which flips codes in the next, through the depth — measured on SmolLM2
   (30 layers): the same fp32 fake-quant W8A8 model run on two GEMM libraries (MKL, oneDNN) differs by 0.107% in PPL,
   the bf16 deployed W8A8 / QuaRot W4A4 models by 0.52% / 0.70% while each of their 210 linears is within 0.50 ulp of
   its reference (DEVELOPERS.md, "Deployed mode"). In a model mixing both kinds, only the activation-quantized
   linears are checked (per linear). The fp32 fake-quant PPL of the same windows is logged beside the rest, so the
   cost of bf16 itself shows.
3. Generation at batch 1 (greedy, KV cache): prefill tokens/s of a `prompt_tokens` prompt and decode tokens/s
   of `new_tokens` tokens, the deployed model against the 16-bit (bf16) model, alternated `reps` times in one
   process; medians and their ratio.
"""

from __future__ import annotations

import copy
import inspect
import statistics
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from methods.core.arch import decoder_linears
from methods.core.formats import QuantizedWeight
from methods.core.qlinear import QLinear
from methods.core.quantizers import DynamicQuantizer
from qkernels.bench import hardware_name
from qkernels.cpu_packed import DEPLOY_DTYPE, Int4CPUWeight, Int8CPUWeight, IntGemmCPUWeight


class DeploymentMismatch(RuntimeError):
    """The deployed model's perplexity differs from the fake-quant model's beyond the tolerance."""


class DeployedLinear(nn.Module):
    """y = kernel(T(x)) + b: the online transform (if any), then the packed weight's kernel (which quantizes
    the activations itself when its format does)."""

    def __init__(self, kernel, bias: torch.Tensor | None, input_transform=None):
        super().__init__()
        self.kernel = kernel
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(DEPLOY_DTYPE), requires_grad=False)
        self.input_transform = input_transform
        self.in_features, self.out_features = kernel.in_features, kernel.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_transform is not None:
            x = self.input_transform(x)
        y = self.kernel.matmul(x).to(x.dtype)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"{self.in_features}->{self.out_features}, {self.kernel.name}"


def kernel_for(module: QLinear):
    """The packed weight that runs this linear on a CPU kernel, or (None, reason)."""
    qweight, act = module.qweight, module.act_quant
    if not isinstance(qweight, QuantizedWeight):
        return None, f"format {type(qweight).__name__}" if qweight is not None else "16-bit weight"
    if act is None or act.bits >= 16:
        kernel = Int4CPUWeight.from_quantized(qweight) or Int8CPUWeight.from_quantized(qweight)
        return (kernel, "") if kernel else (None, f"w{qweight.bits} g{qweight.group_size} weight-only")
    if not isinstance(act, DynamicQuantizer) or not act.sym or act.group_size is not None:
        return None, "activations not per-token symmetric"
    kernel = IntGemmCPUWeight.from_quantized(qweight, act.bits, act.clip_ratio)
    return (kernel, "") if kernel else (None, f"w{qweight.bits} g{qweight.group_size} with a{act.bits}")


@dataclass
class DeploySummary:
    on_kernel: dict[str, int] = field(default_factory=dict)  # kernel name -> linears
    fallback: dict[str, int] = field(default_factory=dict)  # reason -> linears kept fake-quant
    swapped: dict[str, tuple[DeployedLinear, QLinear]] = field(default_factory=dict, repr=False)  # name -> (new, old)

    @property
    def activation_quantized(self) -> dict[str, tuple[DeployedLinear, QLinear]]:
        """The swapped linears whose kernel quantizes activations (the per-linear check gates these)."""
        return {
            name: pair
            for name, pair in self.swapped.items()
            if pair[1].act_quant is not None and pair[1].act_quant.bits < 16
        }

    @property
    def quantizes_activations(self) -> bool:
        return bool(self.activation_quantized)

    @property
    def linears_on_kernel(self) -> int:
        return sum(self.on_kernel.values())

    @property
    def linears_total(self) -> int:
        return self.linears_on_kernel + sum(self.fallback.values())


def deploy(model: nn.Module) -> DeploySummary:
    """Swap every decoder QLinear a kernel runs for its DeployedLinear (in place) and cast the model to bf16."""
    summary = DeploySummary()
    for name, parent, attr, module in list(decoder_linears(model)):
        if not isinstance(module, QLinear):
            summary.fallback["16-bit linear"] = summary.fallback.get("16-bit linear", 0) + 1
            continue
        kernel, reason = kernel_for(module)
        if kernel is None:
            summary.fallback[reason] = summary.fallback.get(reason, 0) + 1
            continue
        deployed = DeployedLinear(kernel, module.bias, module.input_transform)
        setattr(parent, attr, deployed)
        summary.swapped[name] = (deployed, module)
        summary.on_kernel[kernel.name] = summary.on_kernel.get(kernel.name, 0) + 1
    model.to(DEPLOY_DTYPE)
    return summary


def _cache_keyword(model: nn.Module) -> str:
    """transformers ≥ 5.x names the KV cache `cache` (in and out); older versions `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.inference_mode()
def _generate_times(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """(prefill seconds for the prompt, decode seconds for `new_tokens` greedy tokens), batch 1, KV cache."""
    keyword = _cache_keyword(model)
    start = time.perf_counter()
    out = model(prompt, use_cache=True)
    prefill = time.perf_counter() - start
    cache, token = out[keyword], out.logits[:, -1:].argmax(-1)
    if cache is None:
        raise RuntimeError(f"the model returned no KV cache ({keyword}); decode speed needs one")
    start = time.perf_counter()
    for _ in range(new_tokens):
        out = model(token, use_cache=True, **{keyword: cache})
        cache, token = out[keyword], out.logits[:, -1:].argmax(-1)
    return prefill, time.perf_counter() - start


def generation_speed(
    deployed: nn.Module, sixteen_bit: nn.Module, prompt: torch.Tensor, new_tokens: int, reps: int
) -> dict[str, float]:
    """Prefill and decode tokens/s of both models, alternated in one process after a warm-up of each."""
    _generate_times(deployed, prompt[:, :8], 2)
    _generate_times(sixteen_bit, prompt[:, :8], 2)
    times: dict[str, list[tuple[float, float]]] = {"deploy": [], "bf16": []}
    for _ in range(reps):
        times["deploy"].append(_generate_times(deployed, prompt, new_tokens))
        times["bf16"].append(_generate_times(sixteen_bit, prompt, new_tokens))
    metrics = {}
    for name, runs in times.items():
        metrics[f"deploy.{name}.prefill_tok_s"] = prompt.shape[1] / statistics.median(t[0] for t in runs)
        metrics[f"deploy.{name}.decode_tok_s"] = new_tokens / statistics.median(t[1] for t in runs)
    for phase in ("prefill", "decode"):
        metrics[f"deploy.{phase}.speedup"] = (
            metrics[f"deploy.deploy.{phase}_tok_s"] / metrics[f"deploy.bf16.{phase}_tok_s"]
        )
    return metrics


def bf16_ulp(values: torch.Tensor) -> torch.Tensor:
    """The spacing of bf16 numbers (8 significant bits) at each |value|: 2^(⌊log₂|v|⌋ − 7); 0 at 0."""
    values = values.float()
    _, exponent = torch.frexp(values)
    return torch.ldexp(torch.ones_like(values), exponent - 8).masked_fill(values == 0, 0.0)


@dataclass(frozen=True)
class LinearCheck:
    linears: int  # deployed linears compared
    max_ulps: float  # worst |kernel − reference| over every output element, in bf16 ulps of the reference
    worst: str  # the linear where it occurred


def linear_error_ulps(module: DeployedLinear, original: QLinear, x: torch.Tensor) -> float:
    """max |kernel(T(x)) − fake-quant(T(x))| in bf16 ulps of the fp32 reference (floor: 2^-16 · |x̂|·|Ŵ|ᵀ, the
    scale of fp32 accumulation error where the sum cancels)."""
    transformed = module.input_transform(x) if module.input_transform is not None else x
    kernel_out = module.kernel.matmul(transformed).float()
    activations = transformed.float()
    if original.act_quant is not None:
        activations = original.act_quant(activations)
    weight = original.weight.float()
    reference = nn.functional.linear(activations, weight)
    floor = 2.0**-16 * nn.functional.linear(activations.abs(), weight.abs())
    difference, allowance = (kernel_out - reference).abs(), bf16_ulp(reference) + floor
    ulps = difference / allowance.masked_fill(allowance == 0, 1.0)  # an exact zero must come out exactly zero
    ulps = ulps.masked_fill((allowance == 0) & (difference > 0), float("inf"))
    return ulps.nan_to_num(nan=float("inf")).max().item()  # a NaN from the kernel fails


@torch.inference_mode()
def check_linears(model: nn.Module, swapped: dict[str, tuple[DeployedLinear, QLinear]], window) -> LinearCheck:
    """Run the deployed `model` on one window and compare every deployed linear with its fake-quant original on the
    input that linear actually received (so errors do not compound across layers)."""
    worst = LinearCheck(0, 0.0, "")
    errors: dict[str, float] = {}

    def observe(name: str, original: QLinear):
        def hook(module, args, _output):
            errors[name] = max(errors.get(name, 0.0), linear_error_ulps(module, original, args[0]))

        return hook

    handles = [new.register_forward_hook(observe(name, old)) for name, (new, old) in swapped.items()]
    try:
        model(window)
    finally:
        for handle in handles:
            handle.remove()
    if errors:
        name = max(errors, key=errors.get)
        worst = LinearCheck(len(errors), errors[name], name)
    return worst


def check_perplexity(deployed_ppl: float, fake_ppl: float, tolerance: float) -> float:
    """Relative difference; raises DeploymentMismatch beyond `tolerance`."""
    rel = abs(deployed_ppl - fake_ppl) / fake_ppl
    if rel > tolerance:
        raise DeploymentMismatch(
            f"deployed-mode PPL {deployed_ppl:.4f} differs from the fake-quant PPL {fake_ppl:.4f} in bf16 by "
            f"{100 * rel:.3f}% (> {100 * tolerance:.2f}%): a packed format or kernel does not match its format"
        )
    return rel


def mismatch(metrics: dict[str, float], tags: dict[str, str], settings) -> str | None:
    """The one-line reason the deployed model fails its check (module docstring, item 2), or None."""
    if tags["deploy.gate"] == "per-linear" and metrics["deploy.linear_max_ulps"] > settings.linear_ulps:
        return (
            f"deployed linear {tags['deploy.linear_worst']} differs from its fake-quant linear by "
            f"{metrics['deploy.linear_max_ulps']:.1f} bf16 ulps (> {settings.linear_ulps:g}): its packed format or "
            "kernel does not match the format"
        )
    if tags["deploy.gate"] == "perplexity":
        try:
            check_perplexity(metrics["deploy.ppl"], metrics["deploy.fake_bf16_ppl"], settings.tolerance)
        except DeploymentMismatch as error:
            return str(error)
    return None


def bf16_copy(model: nn.Module) -> nn.Module:
    """The fake-quant model in bf16 (the deployed model's reference), leaving `model` as it is."""
    return copy.deepcopy(model).to(DEPLOY_DTYPE)


def evaluate_deployed(
    model: nn.Module, sixteen_bit: nn.Module, token_ids: torch.Tensor, seqlen: int, settings
) -> tuple[dict[str, float], dict[str, str]]:
    """The whole deployed-mode evaluation of a fake-quant `model` (deployed in place): the fp32 and bf16
    fake-quant PPL of the first `settings.windows` windows, deployment, the per-linear check on the first window,
    the deployed PPL, then — when the check passes — batch-1 generation speed against `sixteen_bit`. A failed
    check is the tag `deploy.error` (its one-line reason) and no timing."""
    import json

    from harness.evaluate.perplexity import perplexity

    fake_fp32 = perplexity(model, token_ids, seqlen, 1, settings.windows, progress=False).ppl
    reference = bf16_copy(model)
    fake_bf16 = perplexity(reference, token_ids, seqlen, 1, settings.windows, progress=False).ppl
    del reference
    summary = deploy(model)
    gated = summary.activation_quantized
    linears = check_linears(model, gated or summary.swapped, token_ids[:, :seqlen])
    gate = "per-linear" if gated else "perplexity"
    summary.swapped.clear()  # the fp32 fake-quant linears
    deployed = perplexity(model, token_ids, seqlen, 1, settings.windows, progress=False).ppl
    metrics = {
        "deploy.windows": float(settings.windows),
        "deploy.fake_fp32_ppl": fake_fp32,
        "deploy.fake_bf16_ppl": fake_bf16,
        "deploy.ppl": deployed,
        "deploy.ppl_rel_diff": abs(deployed - fake_bf16) / fake_bf16,
        "deploy.linears_on_kernel": float(summary.linears_on_kernel),
        "deploy.linears_total": float(summary.linears_total),
        "deploy.linears_checked": float(linears.linears),
        "deploy.linear_max_ulps": linears.max_ulps,
    }
    tags = {
        "deploy.kernels": json.dumps(summary.on_kernel),
        "deploy.fallback": json.dumps(summary.fallback),
        "deploy.gate": gate,
        "deploy.linear_worst": linears.worst,
        "deploy.hardware": hardware_name("cpu"),
    }
    reason = mismatch(metrics, tags, settings)
    if reason is not None:
        return metrics, {**tags, "deploy.error": reason}
    prompt = token_ids.reshape(-1)[: settings.prompt_tokens].reshape(1, -1)
    metrics.update(generation_speed(model, sixteen_bit.to(DEPLOY_DTYPE), prompt, settings.new_tokens, settings.reps))
    return metrics, tags
