"""Asymmetric weight-clipping search on calibration activations (AWQ's `auto_clip`, as BitDistiller uses it to
initialise QAT: arXiv 2402.10631 §3.1, code `quantization/autoclip.py`).

For every (output row, input group) of a linear, the clip range [min·(1 − j/n_grid), max·(1 − i/n_grid)],
i, j = 0 … max_shrink·n_grid − 1 (a 10 × 10 grid by default), that minimises the mean over sampled calibration
tokens of the squared error of the group's partial output, (x_g · (Q(clip(w_g)) − w_g))², where Q is the
asymmetric min/max grid of the clipped group. Tokens: every k-th of the calibration tokens so that about
`n_tokens` (512) remain; a linear with an online input transform (a rotated model's R4 or head mixing) is
searched on the transformed inputs its weight multiplies. Linears named q_proj / k_proj are skipped (the authors:
"due to qk bmm, it is hard to clip precisely"). Each block's inputs are the *unclipped* model's (the authors
compute the next block's inputs before applying the clips); the clips are applied to the weights (clamped in place)
at the end.

Written with one einsum per grid point instead of the authors' broadcast product: the same numbers, without
their [rows, tokens, groups, group] intermediate.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from methods.core.arch import arch_of
from methods.core.calibrate import walk_blocks
from methods.core.params import valid

SKIPPED = ("q_proj", "k_proj")


@dataclass(frozen=True)
class ClipSearchSettings:
    n_grid: int = valid(20, ge=1)
    max_shrink: float = valid(0.5, ge=0, lt=1)
    n_tokens: int = valid(512, ge=1)
    batch_size: int = valid(4, ge=1)


def pad_groups_replicating(w: torch.Tensor, group: int) -> torch.Tensor:
    """[rows, cols] -> [rows, n_groups, group], a partial last group filled with copies of the row's last value
    (so the group's min and max are those of its real weights; SmolLM2's 576 = 4.5 groups of 128)."""
    pad = (-w.shape[1]) % group
    if pad:
        w = torch.cat([w, w[:, -1:].expand(-1, pad)], dim=1)
    return w.reshape(w.shape[0], -1, group)


def asym_minmax_fake_quant(w: torch.Tensor, bits: int) -> torch.Tensor:
    """AWQ's `pseudo_quantize_tensor` with a zero point, on groups along the last dim (ties round to even)."""
    max_val, min_val = w.amax(-1, keepdim=True), w.amin(-1, keepdim=True)
    max_int = 2**bits - 1
    scales = (max_val - min_val).clamp(min=1e-5) / max_int
    zeros = (-torch.round(min_val / scales)).clamp(0, max_int)
    return (torch.clamp(torch.round(w / scales) + zeros, 0, max_int) - zeros) * scales


FakeQuant = Callable[[torch.Tensor], torch.Tensor]  # groups along the last dim -> their quantized values


@torch.no_grad()
def search_clip(
    weight: torch.Tensor, inputs: torch.Tensor, fake_quant: FakeQuant, group: int, settings: ClipSearchSettings
) -> tuple[torch.Tensor, torch.Tensor]:
    """(max, min) clip bounds, each [rows, n_groups, 1], for `weight` [rows, cols] given `inputs` [tokens, cols];
    `fake_quant` is the grid the clipped groups are quantized on (`asym_minmax_fake_quant` with the bits bound,
    or BitDistiller's NF3)."""
    w = pad_groups_replicating(weight.float(), group)
    x = nn.functional.pad(inputs.float(), (0, w.shape[1] * group - weight.shape[1]))  # zero inputs: no output
    x = x.reshape(x.shape[0], w.shape[1], group)
    org_max, org_min = w.amax(-1, keepdim=True), w.amin(-1, keepdim=True)
    best_max, best_min = org_max.clone(), org_min.clone()
    best_err = torch.full_like(org_max, float("inf"))
    steps = int(settings.max_shrink * settings.n_grid)
    shrink = torch.tensor([1 - j / settings.n_grid for j in range(steps)]).view(-1, 1, 1, 1)
    min_vals = org_min.unsqueeze(0) * shrink  # every min shrink at once: [steps, rows, groups, 1]
    for i in range(steps):
        max_val = org_max * (1 - i / settings.n_grid)
        delta = fake_quant(torch.clamp(w.unsqueeze(0), min_vals, max_val)) - w
        errs = torch.einsum("tgk,jrgk->jrgt", x, delta).pow(2).mean(-1, keepdim=True)
        for j in range(steps):  # in the authors' order, so ties resolve as theirs do
            better = errs[j] < best_err
            best_err = torch.where(better, errs[j], best_err)
            best_max = torch.where(better, max_val, best_max)
            best_min = torch.where(better, min_vals[j], best_min)
    return best_max, best_min


class _TokenSampler:
    """Forward hook keeping every `stride`-th input token (counted over all calibration tokens) of a linear."""

    def __init__(self, stride: int):
        self.stride, self.seen, self.kept = stride, 0, []

    def __call__(self, module, inputs, output):
        x = inputs[0]
        transform = getattr(module, "input_transform", None)  # a rotated model's online transform (QLinear)
        if transform is not None:
            x = transform(x)
        x = x.reshape(-1, x.shape[-1])
        first = (-self.seen) % self.stride
        self.kept.append(x[first :: self.stride].detach().float())
        self.seen += x.shape[0]


@torch.no_grad()
def clip_model_weights(
    model: nn.Module,
    windows: list[torch.Tensor],
    fake_quant: FakeQuant,
    group: int | None,
    settings: ClipSearchSettings,
) -> dict[str, float]:
    """Search every decoder linear's clips (except q/k) block by block, then clamp the weights. Returns the mean
    fraction of the original range kept, for the record."""
    arch = arch_of(model)
    total_tokens = sum(w.numel() for w in windows)
    stride = max(1, total_tokens // settings.n_tokens)
    clips = []
    for _, block, inputs in walk_blocks(model, windows, settings.batch_size, desc="clip search"):
        linears = {
            name: getattr(parent, attr)
            for name, (parent, attr) in arch.block_linears(block).items()
            if name.rsplit(".", 1)[-1] not in SKIPPED
        }
        samplers = {name: _TokenSampler(stride) for name in linears}
        handles = [linears[name].register_forward_hook(samplers[name]) for name in linears]
        for hidden, kwargs in zip(inputs.hidden, inputs.kwargs, strict=True):
            block(hidden, **kwargs)
        for handle in handles:
            handle.remove()
        for name, linear in linears.items():
            cols = linear.weight.shape[1]
            features = torch.cat(samplers[name].kept)
            bounds = search_clip(linear.weight, features, fake_quant, group or cols, settings)
            clips.append((linear, group or cols, *bounds))
    kept = []
    for linear, group_size, max_val, min_val in clips:  # applied after the walk: every block saw unclipped inputs
        rows, cols = linear.weight.shape
        grouped = pad_groups_replicating(linear.weight.data, group_size)
        span = grouped.amax(-1, keepdim=True) - grouped.amin(-1, keepdim=True)
        kept.append(float(((max_val - min_val) / span.clamp(min=1e-12)).mean()))
        clipped = torch.clamp(grouped, min_val.to(grouped.dtype), max_val.to(grouped.dtype))
        linear.weight.data = clipped.reshape(rows, -1)[:, :cols].contiguous()
    return {"clip_range_kept": sum(kept) / max(len(kept), 1), "clip_linears": float(len(clips))}
