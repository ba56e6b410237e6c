"""A linear layer with fake-quantized weights, an input (activation) quantizer and an optional online
transform applied to the input before it is quantized (QuaRot's online Hadamard before down_proj)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from tqdm import tqdm

from methods.core.formats import QuantizedTensor, check_format
from methods.core.quantizers import DynamicQuantizer


class QLinear(nn.Module):
    """y = (Q_w(W)) · Q_a(T(x)) + b, simulated in floating point (the protocol every paper uses).

    `weight` holds the dequantized weight; `qweight` keeps the codes/scales for packing and accounting.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        qweight: QuantizedTensor | None = None,
        act_quant: DynamicQuantizer | None = None,
        input_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.qweight = qweight
        self.act_quant = act_quant
        self.input_transform = input_transform

    @classmethod
    def wrap(cls, linear: nn.Linear, **kwargs) -> QLinear:
        return cls(linear.weight.data, None if linear.bias is None else linear.bias.data, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_transform is not None:
            x = self.input_transform(x)
        if self.act_quant is not None:
            x = self.act_quant(x)
        return nn.functional.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def storage_bits(self) -> int:
        """Weight storage: every stored bit of the quantized format, else 16 bits per weight."""
        if self.qweight is not None:
            return check_format(self.qweight).storage_bits()
        return self.weight.numel() * 16

    def extra_repr(self) -> str:
        wq = type(self.qweight).__name__ if self.qweight is not None else "w16"
        aq = f"a{self.act_quant.bits}" if self.act_quant else "a16"
        return f"{self.in_features}->{self.out_features}, {wq}, {aq}, transform={self.input_transform is not None}"


def set_quantized_weight(parent: nn.Module, attr: str, module: nn.Module, qweight: QuantizedTensor) -> None:
    """Store a quantized weight in place (an existing QLinear keeps its transform and act quantizer) or wrap."""
    deq = qweight.dequantize().to(module.weight.dtype)
    if isinstance(module, QLinear):
        module.weight.data = deq
        module.qweight = qweight
    else:
        setattr(parent, attr, QLinear(deq, module.bias, qweight=qweight))


def attach_act_quantizers(model: nn.Module, quantizer_for: Callable[[str], Callable | None]) -> None:
    """Give every decoder linear the input quantizer `quantizer_for(qualified name)` (wrapping plain linears in
    `QLinear`; an existing QLinear keeps its weight, format and online transform). Idempotent."""
    from methods.core.arch import decoder_linears

    for name, parent, attr, module in list(decoder_linears(model)):
        if not isinstance(module, QLinear):
            module = QLinear.wrap(module)
            setattr(parent, attr, module)
        module.act_quant = quantizer_for(name)


def quantize_decoder_linears(model: nn.Module, quantize: Callable[[torch.Tensor], QuantizedTensor]) -> None:
    """Replace every decoder linear's weight by `quantize(weight)` (data-free methods: RTN, QuaRot-RTN)."""
    from methods.core.arch import decoder_linears

    for _, parent, attr, linear in tqdm(list(decoder_linears(model)), desc="quantize weights", unit="linear"):
        set_quantized_weight(parent, attr, linear, quantize(linear.weight.data))
