"""LO-BCQ activations (`act=bcq`; Elangovan et al., arXiv 2502.05376): every decoder linear's input is
encoded online, token by token — E4M3 scale per block array, min-MSE codebook per block of L_b, 4-bit entry
index per scalar — with the universal codebooks. Under `method=bcq` the weight method hands over its
codebooks (designed on weights and activations together, as the paper's); under any other weight method the
plug-in designs its own by LO-BCQ on activation blocks of the calibration windows. See methods/core/bcq.py.

q_proj, k_proj and v_proj (and gate/up) read the same tensor: it is encoded once and the result reused.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from methods.core import bcq
from methods.core.params import valid
from methods.core.qlinear import attach_act_quantizers


@dataclass(frozen=True)
class BCQActConfig:
    block_len: int = valid(8, ge=1)
    array_len: int = valid(64, ge=1)
    n_codebooks: int = valid(16, ge=1)
    entry_bits: int = valid(6, ge=2, le=8)
    iterations: int = valid(20, ge=0)
    lloyd_iterations: int = valid(1, ge=0)
    calib_blocks: int = valid(100_000, ge=1)

    def layout(self) -> bcq.BCQLayout:
        return bcq.BCQLayout(self.block_len, self.array_len, self.n_codebooks, self.entry_bits)


@dataclass
class _SharedInputEncoder:
    """Fake-quantizes x with the codebooks, remembering the last input so linears that share it pay once."""

    codebooks: torch.Tensor
    layout: bcq.BCQLayout
    last: tuple = field(default=(None, -1, None))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        seen, version, out = self.last
        if seen is x and version == _version(x):
            return out
        out = bcq.fake_quantize(x, self.codebooks, self.layout)
        self.last = (x, _version(x), out)
        return out


def _version(x: torch.Tensor) -> int:
    """In-place modification counter; inference tensors keep none (and are not modified between siblings)."""
    return -1 if x.is_inference() else x._version


@dataclass
class BCQActQuantizer:
    bits: int
    config: BCQActConfig
    codebooks: torch.Tensor | None = None
    layout: bcq.BCQLayout | None = None

    @property
    def needs_calibration(self) -> bool:
        return self.codebooks is None

    def use_codebooks(self, codebooks: torch.Tensor, layout: bcq.BCQLayout) -> None:
        """The weight method's universal codebooks (method=bcq)."""
        self.codebooks, self.layout = codebooks, layout

    def fit(self, model: nn.Module, windows) -> None:
        layout = self.config.layout()
        generator = torch.Generator().manual_seed(0)
        blocks = bcq.activation_blocks(model, windows, layout, self.config.calib_blocks, generator)
        real, _ = bcq.lo_bcq(blocks, layout.n_codebooks, self.config.iterations, self.config.lloyd_iterations)
        self.use_codebooks(bcq.integer_entries(real, layout), layout)

    def attach(self, model: nn.Module) -> None:
        if self.codebooks is None:
            raise RuntimeError("act=bcq: fit(model, calibration windows) must run before attach")
        encoder = _SharedInputEncoder(self.codebooks, self.layout)
        attach_act_quantizers(model, lambda name: encoder)


def build(config: BCQActConfig, bits: int) -> BCQActQuantizer:
    if bits != 4:
        raise ValueError(f"act=bcq encodes 4-bit indices: use a4 (got a{bits})")
    return BCQActQuantizer(bits, config)
