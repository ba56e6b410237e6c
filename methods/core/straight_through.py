"""Attached act/KV quantizers behind a straight-through estimator, for methods that train with them in the loop
(RCP's QAT, OmniQuant's LET): the forward quantizes, the gradient passes as if it did not. The runner re-attaches
the plain quantizers to the final model."""

from __future__ import annotations

from torch import nn

from methods.core.arch import decoder_linears
from methods.core.attention import attention_states
from methods.core.qat import TrainableQLinear
from methods.core.qlinear import QLinear
from methods.core.rotation import RotatedQuantizer


def straight_through_plugins(model: nn.Module) -> None:
    identity = lambda x: x  # noqa: E731
    for _, _, _, module in decoder_linears(model):
        if isinstance(module, QLinear | TrainableQLinear) and module.act_quant is not None:
            module.act_quant = RotatedQuantizer(module.act_quant, identity, identity)
    for state in attention_states(model):
        if state.key_quant is not None:
            state.key_quant = RotatedQuantizer(state.key_quant, identity, identity)
        if state.value_quant is not None:
            state.value_quant = RotatedQuantizer(state.value_quant, identity, identity)
