"""Quantization-aware training modules: `prepare` swaps decoder linears for trainable fake-quant linears, `convert`
freezes them into the format objects the evaluators read (the prepare/convert pattern of torchao's QAT).

A `TrainableQLinear` holds the latent fp32 weight (a trainable parameter), a weight quantizer module that may
hold learnable parameters of its own (clip bounds, LSQ/SEQ step sizes, non-uniform levels) and returns the
fake-quantized weight with straight-through gradients, plus the input transform and activation quantizer the
linear already had (a rotation's online transform, the `act=` plug-in). A weight quantizer implements:

    forward(weight) -> fake-quantized weight (differentiable w.r.t. the weight and its own parameters)
    freeze(weight) -> a `methods.core.formats` object (codes + scales/levels) whose dequantize() equals forward

Embeddings, lm_head and norms stay as they are (16-bit, trainable or not as the trainer's groups say).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from methods.core.arch import decoder_linears
from methods.core.qlinear import QLinear


class TrainableQLinear(nn.Module):
    """y = Q_w(W) · Q_a(T(x)) + b with W a trainable latent weight and Q_w a (possibly learnable) module."""

    def __init__(self, linear: nn.Module, weight_quantizer: nn.Module):
        super().__init__()
        self.weight = nn.Parameter(linear.weight.detach().float().clone())
        bias = getattr(linear, "bias", None)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone())
        self.weight_quantizer = weight_quantizer
        self.act_quant = getattr(linear, "act_quant", None)
        self.input_transform = getattr(linear, "input_transform", None)
        # an equivalent transformation trained with the quantizer (OmniQuant's LET): W -> T(W) before Q_w
        self.weight_transform: Callable[[torch.Tensor], torch.Tensor] | None = None

    def transformed_weight(self) -> torch.Tensor:
        return self.weight if self.weight_transform is None else self.weight_transform(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_transform is not None:
            x = self.input_transform(x)
        if self.act_quant is not None:
            x = self.act_quant(x)
        weight = self.weight_quantizer(self.transformed_weight()).to(x.dtype)
        return nn.functional.linear(x, weight, None if self.bias is None else self.bias.to(x.dtype))

    def to_qlinear(self) -> QLinear:
        with torch.no_grad():
            qweight = self.weight_quantizer.freeze(self.transformed_weight())
            deq = qweight.dequantize().to(self.weight.dtype)
        return QLinear(deq, self.bias, qweight=qweight, act_quant=self.act_quant, input_transform=self.input_transform)


def prepare(model: nn.Module, make_quantizer: Callable[[str, torch.Tensor], nn.Module]) -> list[str]:
    """Replace every decoder linear by a `TrainableQLinear` whose weight quantizer is `make_quantizer(name,
    weight)` (initialised from the weight, e.g. LSQ's step from max|W|). Returns the replaced names."""
    names = []
    for name, parent, attr, linear in list(decoder_linears(model)):
        weight = linear.weight.detach().float()
        setattr(parent, attr, TrainableQLinear(linear, make_quantizer(name, weight)))
        names.append(name)
    return names


def convert(model: nn.Module) -> None:
    """Freeze every `TrainableQLinear` into a `QLinear` holding its format object (what memory, latency and the
    packed kernels read); the model's function is unchanged (tests check the logits)."""
    for _, parent, attr, module in list(decoder_linears(model)):
        if isinstance(module, TrainableQLinear):
            setattr(parent, attr, module.to_qlinear())
