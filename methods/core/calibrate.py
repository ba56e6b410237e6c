"""Layer-by-layer calibration (GPTQ §4 "sequential"): keep one decoder block and its activations in memory.

`capture_block_inputs` runs the model once per calibration batch with every decoder block replaced by an
identity stand-in that records what it is called with: the first block's hidden states, and each block's
own keyword arguments (attention mask, RoPE tables). Blocks of one model may differ in those (Gemma 3's
sliding-window and full-attention layers have different masks and RoPE bases), so each block replays its
own. The forward stops at the final norm, so lm_head (262k rows for Gemma 3) is never computed.
`walk_blocks` then walks the blocks: for each it exposes the block's inputs, lets the method collect
statistics (e.g. Hessians) through hooks and change the block (quantize it), and finally computes the
block's outputs — with the *modified* block — as the next block's inputs.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from methods.core.arch import ArchAdapter, arch_of
from methods.core.cpu_gemm import gram


class _StopForward(Exception):
    pass


@dataclass
class BlockInputs:
    hidden: list[torch.Tensor]  # one [batch, seq, hidden] tensor per calibration batch
    kwargs: list[dict] = field(default_factory=list)  # per batch: this block's mask, position embeddings...


class _Recorder(nn.Module):
    """Stands in for a decoder block during capture: records its call, passes the hidden states through."""

    def __init__(self, index: int, calls: dict[int, list]):
        super().__init__()
        self.index, self.calls = index, calls

    def forward(self, *args, **kwargs):
        hidden_states = args[0] if args else kwargs.pop("hidden_states")
        self.calls.setdefault(self.index, []).append((hidden_states, kwargs))
        return hidden_states


def _raise_stop(module, args):
    raise _StopForward


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, windows: list[torch.Tensor], batch_size: int = 4
) -> tuple[BlockInputs, list[list[dict]]]:
    """(inputs of block 0, per-block per-batch keyword arguments)."""
    arch = arch_of(model)
    layers = arch.layers(model)
    originals = list(layers)
    calls: dict[int, list] = {}
    for index in range(len(layers)):
        layers[index] = _Recorder(index, calls)
    handle = arch.final_norm(model).register_forward_pre_hook(_raise_stop)
    try:
        device = next(model.parameters()).device
        for start in range(0, len(windows), batch_size):
            try:
                model(torch.cat(windows[start : start + batch_size]).to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
        for index, layer in enumerate(originals):
            layers[index] = layer
    block_kwargs = [[kwargs for _, kwargs in calls[index]] for index in range(len(originals))]
    return BlockInputs(hidden=[hidden for hidden, _ in calls[0]], kwargs=block_kwargs[0]), block_kwargs


def shared_input_owner(arch: ArchAdapter) -> dict[str, str]:
    """Linear name -> the linear whose Hessian it shares (they read the same tensor)."""
    return {name: group[0] for group in arch.shared_input_groups() for name in group[1:]}


class HessianCollector:
    """Accumulates H = 2/N Σ x xᵀ over all N calibration tokens at the input of each given linear (GPTQ Eq. 2).

    The input seen is the one the weight multiplies: after the module's online transform, if it has one.
    `sink_weight` ≠ 1 weights the rows of each sequence's first position (the attention sink) by that factor:
    H = 2/N Σ w_t x_t x_tᵀ (an option of `methods.core.gptq`; 1 is GPTQ's Eq. 2).
    Inputs are read by forward *pre*-hooks; `collect` runs a block over its calibration inputs and stops each
    forward as soon as every collected linear has seen its input (the rest of the block would be discarded:
    after down_proj's input nothing is needed; true-sequential's q/k/v group needs only the first norm).
    """

    def __init__(self, linears: dict[str, nn.Module], shared: dict[str, str], sink_weight: float = 1.0):
        self.shared, self.sink_weight = shared, sink_weight
        self.hessians: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}
        self._owners = [name for name in linears if name not in shared]
        self._seen: set[str] = set()
        self._stop_when_done = False
        self._handles = [
            module.register_forward_pre_hook(self._hook(name)) for name, module in linears.items() if name not in shared
        ]

    def _hook(self, name: str):
        def hook(module, inputs):
            x = inputs[0]
            transform = getattr(module, "input_transform", None)
            if transform is not None:
                x = transform(x)
            if self.sink_weight != 1.0 and x.dim() == 3:
                x = x.clone()
                x[:, 0] *= self.sink_weight**0.5
            x = x.reshape(-1, x.shape[-1]).float()
            if name not in self.hessians:
                self.hessians[name] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
                self.tokens[name] = 0
            self.hessians[name] += gram(x).double()
            self.tokens[name] += x.shape[0]
            self._seen.add(name)
            if self._stop_when_done and len(self._seen) == len(self._owners):
                raise _StopForward

        return hook

    @torch.no_grad()
    def collect(self, block: nn.Module, inputs: BlockInputs) -> None:
        """Run `block` on every calibration batch, each only as far as the collected linears' inputs."""
        self._stop_when_done = True
        try:
            for hidden, kwargs in zip(inputs.hidden, inputs.kwargs, strict=True):
                self._seen.clear()
                try:
                    block(hidden, **kwargs)
                except _StopForward:
                    pass
                missing = set(self._owners) - self._seen
                if missing:
                    raise RuntimeError(f"the block's forward never reached {', '.join(sorted(missing))}")
        finally:
            self._stop_when_done = False

    def hessian(self, name: str) -> torch.Tensor:
        name = self.shared.get(name, name)
        return (2.0 / self.tokens[name]) * self.hessians[name]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


@torch.no_grad()
def run_block(block: nn.Module, inputs: BlockInputs) -> list[torch.Tensor]:
    outputs = []
    for hidden, kwargs in zip(inputs.hidden, inputs.kwargs, strict=True):
        out = block(hidden, **kwargs)
        outputs.append(out[0] if isinstance(out, tuple) else out)
    return outputs


def walk_blocks(
    model: nn.Module, windows: list[torch.Tensor], batch_size: int = 4, desc: str = "calibrate"
) -> Iterator[tuple[int, nn.Module, BlockInputs]]:
    """Yield (index, block, inputs) for each decoder block, with a progress bar; after the caller's work on
    a block, its outputs (computed with the possibly-modified block) become the next block's inputs (not
    computed after the last block)."""
    inputs, block_kwargs = capture_block_inputs(model, windows, batch_size)
    layers = arch_of(model).layers(model)
    for index, block in enumerate(tqdm(layers, desc=desc, unit="block")):
        inputs = BlockInputs(hidden=inputs.hidden, kwargs=block_kwargs[index])
        yield index, block, inputs
        if index < len(layers) - 1:  # the last block's outputs would feed nothing
            inputs = BlockInputs(hidden=run_block(block, inputs), kwargs=block_kwargs[index])
