"""Where a quantized model first produces NaN or inf.

A collapsed model's perplexity (nan, inf) is not a number to rank: the run ends DIVERGED, naming the module
whose output first held a non-finite value. Forward hooks fire as modules *finish*, so on one forward pass the
first hook that sees a non-finite output belongs to the innermost module that produced it (a linear, not the
decoder block around it).
"""

from __future__ import annotations

import torch
from torch import nn


def _tensors(output) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in _tensors(item)]
    if hasattr(output, "values"):  # transformers' ModelOutput
        return [t for item in output.values() for t in _tensors(item)]
    return []


def _nonfinite(output) -> bool:
    return any(t.is_floating_point() and not bool(torch.isfinite(t).all()) for t in _tensors(output))


@torch.inference_mode()
def first_nonfinite_module(model: nn.Module, input_ids: torch.Tensor) -> str | None:
    """The qualified name of the first module whose output is not finite on `input_ids`, or None."""
    found: list[str] = []

    def watch(name: str):
        def hook(_module, _args, output):
            if not found and _nonfinite(output):
                found.append(name)

        return hook

    handles = [module.register_forward_hook(watch(name)) for name, module in model.named_modules() if name]
    try:
        model(input_ids.to(next(model.parameters()).device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return found[0] if found else None


def divergence_message(model: nn.Module, window: torch.Tensor, index: int) -> str:
    """One line for the run record: where the first non-finite value appeared, on which evaluation window."""
    where = first_nonfinite_module(model, window)
    if where is None:  # every module's output finite: the loss itself overflowed
        return f"non-finite loss on window {index} (every module's output finite)"
    return f"non-finite output first at {where} (window {index})"
