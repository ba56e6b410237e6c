"""Layer-by-layer calibration (GPTQ §4 "sequential"): keep one decoder block and its activations in memory.

`capture_block_inputs` runs the model up to the first block and records its inputs for every calibration
window; `LayerwiseRunner` then walks the blocks: for each it exposes the block's inputs, lets the method
collect statistics (e.g. Hessians) through hooks and change the block (quantize it), and finally computes
the block's outputs — with the *modified* block — as the next block's inputs.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from methods.core.qlinear import DECODER_LINEARS


class _StopForward(Exception):
    pass


@dataclass
class BlockInputs:
    hidden: list[torch.Tensor]  # one [batch, seq, hidden] tensor per calibration batch
    kwargs: dict = field(default_factory=dict)  # position embeddings, masks... shared by all batches


@torch.no_grad()
def capture_block_inputs(model: nn.Module, windows: list[torch.Tensor], batch_size: int = 4) -> BlockInputs:
    first = model.model.layers[0]
    captured = BlockInputs(hidden=[])

    def hook(module, args, kwargs):
        captured.hidden.append(args[0] if args else kwargs["hidden_states"])
        if not captured.kwargs:
            captured.kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise _StopForward

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for start in range(0, len(windows), batch_size):
            batch = torch.cat(windows[start : start + batch_size]).to(next(model.parameters()).device)
            try:
                model(batch, use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured


def block_linears(block: nn.Module) -> dict[str, nn.Module]:
    found = {}
    for parent_name in ("self_attn", "mlp"):
        parent = getattr(block, parent_name)
        for attr in DECODER_LINEARS:
            if hasattr(parent, attr):
                found[f"{parent_name}.{attr}"] = getattr(parent, attr)
    return found


# Linears that read the same input share one Hessian (q/k/v read the normed stream, gate/up the other one).
SHARED_INPUT = {
    "self_attn.k_proj": "self_attn.q_proj",
    "self_attn.v_proj": "self_attn.q_proj",
    "mlp.up_proj": "mlp.gate_proj",
}


class HessianCollector:
    """Accumulates H = 2/N Σ x xᵀ over all N calibration tokens at the input of each given linear (GPTQ Eq. 2).

    The input seen is the one the weight multiplies: after the module's online transform, if it has one.
    """

    def __init__(self, linears: dict[str, nn.Module]):
        self.hessians: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}
        self._handles = [
            module.register_forward_hook(self._hook(name))
            for name, module in linears.items()
            if name not in SHARED_INPUT
        ]

    def _hook(self, name: str):
        def hook(module, inputs, output):
            x = inputs[0]
            transform = getattr(module, "input_transform", None)
            if transform is not None:
                x = transform(x)
            x = x.reshape(-1, x.shape[-1]).float()
            if name not in self.hessians:
                self.hessians[name] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
                self.tokens[name] = 0
            self.hessians[name] += (x.T @ x).double()
            self.tokens[name] += x.shape[0]

        return hook

    def hessian(self, name: str) -> torch.Tensor:
        name = SHARED_INPUT.get(name, name)
        return (2.0 / self.tokens[name]) * self.hessians[name]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


@torch.no_grad()
def run_block(block: nn.Module, inputs: BlockInputs) -> list[torch.Tensor]:
    outputs = []
    for hidden in inputs.hidden:
        out = block(hidden, **inputs.kwargs)
        outputs.append(out[0] if isinstance(out, tuple) else out)
    return outputs


def walk_blocks(
    model: nn.Module, windows: list[torch.Tensor], batch_size: int = 4
) -> Iterator[tuple[int, nn.Module, BlockInputs]]:
    """Yield (index, block, inputs) for each decoder block; after the caller's work on a block, its outputs
    (computed with the possibly-modified block) become the next block's inputs."""
    inputs = capture_block_inputs(model, windows, batch_size)
    for index, block in enumerate(model.model.layers):
        yield index, block, inputs
        inputs = BlockInputs(hidden=run_block(block, inputs), kwargs=inputs.kwargs)
