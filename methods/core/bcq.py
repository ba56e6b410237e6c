"""Block clustered quantization (BCQ) and its locally-optimal codebook design (LO-BCQ; Elangovan, Sakr,
Raghunathan, Khailany, arXiv 2502.05376, §2). No public code: written from the paper's description.

An operand [rows, cols] is cut along the reduction dimension (cols) into *block arrays* of `array_len` (L_A)
scalars that share one 8-bit E4M3 scale, and each array into *blocks* of `block_len` (L_b) contiguous
scalars. Every block picks one of `n_codebooks` (N_c) codebooks of 16 entries (integers of `entry_bits`, INT6
by default) — the one with the least squared error — and stores a 4-bit index per scalar. Effective bits per
scalar: 4 + log2(N_c)/L_b + 8/L_A (§2.1): 4.625 at L_b = 8, N_c = 16, L_A = 64; 4.5625 at L_A = 128.

Scales: the array scale maps the array's absolute maximum onto the largest codebook magnitude (2^(e−1) − 1)
and is rounded to E4M3; E4M3 spans 2^−9…448, so a second, fp32 scale per row brings each row into that
span (the paper's per-tensor scale, taken per row so that activations, encoded online token by token, fit too;
32 bits per row are counted in the storage).

LO-BCQ (§2.2): starting from initial codebooks, alternate (1) assign every block to the codebook with the
least MSE and (2) refit each codebook by Lloyd-Max on the scalars of the blocks assigned to it. Neither step
can raise the total MSE (`lo_bcq` records it per iteration). The entries are then rounded to integers of
`entry_bits`. Initialisation — left open by the text we could read — is ours: blocks sorted by their
absolute maximum into N_c equal groups, each codebook started from a uniform 16-level grid over its group's
range and refined by Lloyd-Max on that group (blocks with small values get fine codebooks near zero).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from methods.core import quantizers
from methods.core.arch import decoder_linears

E4M3_MAX = 448.0
INDEX_BITS = 4  # 16 entries per codebook
ENTRIES = 2**INDEX_BITS
ROW_SCALE_BITS = 32
ARRAY_SCALE_BITS = 8


@dataclass(frozen=True)
class BCQLayout:
    block_len: int = 8  # L_b
    array_len: int = 64  # L_A: SmolLM2's 576 = 9 x 64 (the paper's 128 does not divide it)
    n_codebooks: int = 16  # N_c
    entry_bits: int = 6  # codebook entries are signed integers of this width

    @property
    def entry_max(self) -> int:
        return 2 ** (self.entry_bits - 1) - 1

    @property
    def selector_bits(self) -> int:
        return math.ceil(math.log2(self.n_codebooks)) if self.n_codebooks > 1 else 0

    def effective_bits(self) -> float:
        """Bits per scalar, as the paper counts them (codes, selectors, array scales)."""
        return INDEX_BITS + self.selector_bits / self.block_len + ARRAY_SCALE_BITS / self.array_len

    def check(self) -> None:
        if self.array_len % self.block_len:
            raise ValueError(f"array_len {self.array_len} must be a multiple of block_len {self.block_len}")

    def padded(self, cols: int) -> int:
        """Columns rounded up to whole block arrays (zero padding: a width L_A does not divide, e.g. the paper's
        L_A = 128 on SmolLM2's 576, costs the padded codes, which the storage counts)."""
        return -(-cols // self.array_len) * self.array_len


def e4m3(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest float8 E4M3 value (saturating at 448)."""
    return x.clamp(max=E4M3_MAX).to(torch.float8_e4m3fn).float()


def normalize(x: torch.Tensor, layout: BCQLayout):
    """x [rows, cols] -> (blocks [rows, padded cols / L_b, L_b] in codebook units, row scales fp32 [rows],
    array scales E4M3 [rows, padded cols / L_A]); columns zero-padded to whole block arrays."""
    rows, cols = x.shape
    layout.check()
    arrays = torch.nn.functional.pad(x.float(), (0, layout.padded(cols) - cols)).reshape(rows, -1, layout.array_len)
    array_max = arrays.abs().amax(dim=-1)
    row_scale = array_max.amax(dim=-1) / (layout.entry_max * E4M3_MAX)
    row_scale = torch.where(row_scale > 0, row_scale, torch.ones_like(row_scale))
    array_scale = e4m3(array_max / layout.entry_max / row_scale[:, None])
    divisor = (array_scale * row_scale[:, None]).unsqueeze(-1)
    scaled = torch.where(divisor > 0, arrays / torch.where(divisor > 0, divisor, 1.0), 0.0)
    return scaled.reshape(rows, -1, layout.block_len), row_scale, array_scale


def _breakpoints(codebooks: torch.Tensor):
    """For nearest-entry search against every codebook at once: the union of all codebooks' decision
    boundaries, and for each interval between them the nearest entry of every codebook (index and value)."""
    sorted_books = torch.sort(codebooks, dim=-1).values
    mids = ((sorted_books[:, 1:] + sorted_books[:, :-1]) / 2).flatten().unique()
    probes = torch.cat([mids[:1] - 1, (mids[1:] + mids[:-1]) / 2, mids[-1:] + 1]) if mids.numel() else torch.zeros(1)
    nearest = (probes[:, None, None] - codebooks[None]).abs().argmin(dim=-1)  # [intervals, N_c]
    return mids, nearest, codebooks.gather(1, nearest.T).T.contiguous()  # values [intervals, N_c]


def encode_blocks(blocks: torch.Tensor, codebooks: torch.Tensor, chunk: int = 1 << 17):
    """Min-MSE codebook per block and nearest entry per scalar. blocks [..., L_b]; codebooks [N_c, 16].
    Returns (selectors [...], indices [..., L_b], squared error per block [...])."""
    shape = blocks.shape
    flat = blocks.reshape(-1, shape[-1]).float()
    mids, nearest, nearest_values = _breakpoints(codebooks.float())
    selectors = torch.empty(flat.shape[0], dtype=torch.long)
    indices = torch.empty(flat.shape, dtype=torch.long)
    errors = torch.empty(flat.shape[0])
    for start in range(0, flat.shape[0], chunk):
        part = flat[start : start + chunk]
        interval = torch.bucketize(part, mids)  # [n, L_b]
        err = ((part.unsqueeze(-1) - nearest_values[interval]) ** 2).sum(dim=1)  # [n, N_c]
        best_err, best = err.min(dim=-1)
        selectors[start : start + chunk] = best
        indices[start : start + chunk] = nearest[interval, best.unsqueeze(-1)]
        errors[start : start + chunk] = best_err
    return selectors.reshape(shape[:-1]), indices.reshape(shape), errors.reshape(shape[:-1])


def quantize_blocks(blocks: torch.Tensor, codebooks: torch.Tensor, chunk: int = 1 << 17) -> torch.Tensor:
    """decode(encode(blocks)) without materialising indices (the online activation path). Under the harness's
    compiled-quantizer switch (`quantizers.compiling()`, on for evaluation) one fused pass per codebook keeps
    the running best block — the same values (first least-error codebook wins in both), ~2.6x faster here."""
    shape = blocks.shape
    flat = blocks.reshape(-1, shape[-1]).float()
    mids, _, nearest_values = _breakpoints(codebooks.float())
    if quantizers.compiling() and not flat.requires_grad:
        return _compiled_best_blocks(flat, mids, nearest_values).reshape(shape)
    out = torch.empty_like(flat)
    for start in range(0, flat.shape[0], chunk):
        part = flat[start : start + chunk]
        candidates = nearest_values[torch.bucketize(part, mids)]  # [n, L_b, N_c]
        best = ((part.unsqueeze(-1) - candidates) ** 2).sum(dim=1).argmin(dim=-1)
        out[start : start + chunk] = candidates.gather(-1, best[:, None, None].expand(-1, shape[-1], 1))[..., 0]
    return out.reshape(shape)


def _best_blocks_by_codebook(flat: torch.Tensor, mids: torch.Tensor, nearest_values: torch.Tensor) -> torch.Tensor:
    """Each block's decoded values under its least-error codebook, codebook by codebook (for torch.compile)."""
    interval = torch.bucketize(flat, mids)
    best_err, best_values = None, None
    for c in range(nearest_values.shape[1]):
        values = nearest_values[:, c][interval]
        err = ((flat - values) ** 2).sum(dim=-1)
        if best_err is None:
            best_err, best_values = err, values
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_values = torch.where(better[:, None], values, best_values)
    return best_values


_COMPILED: dict[str, object] = {}


def _compiled_best_blocks(flat, mids, nearest_values):
    """The compiled encoder; eager on a machine where compiling fails (same values)."""
    if "fn" not in _COMPILED:
        _COMPILED["fn"] = torch.compile(_best_blocks_by_codebook, dynamic=True)
    try:
        return _COMPILED["fn"](flat, mids, nearest_values)
    except Exception as error:  # torch.compile raises backend-specific errors
        warnings.warn(
            f"torch.compile of the LO-BCQ encoder failed ({type(error).__name__}); running eager", stacklevel=2
        )
        _COMPILED["fn"] = _best_blocks_by_codebook
        return _best_blocks_by_codebook(flat, mids, nearest_values)


def decode_blocks(selectors: torch.Tensor, indices: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    return codebooks[selectors.unsqueeze(-1).expand_as(indices), indices]


def _lloyd_max(values: torch.Tensor, levels: torch.Tensor, iterations: int) -> torch.Tensor:
    """Lloyd-Max on scalars: each level moves to the mean of the values nearest to it (empty cells stay)."""
    levels = torch.sort(levels).values
    for _ in range(iterations):
        cell = torch.bucketize(values, (levels[1:] + levels[:-1]) / 2)
        sums = torch.zeros_like(levels).index_add_(0, cell, values)
        counts = torch.bincount(cell, minlength=levels.numel()).to(values.dtype)
        levels = torch.sort(torch.where(counts > 0, sums / counts.clamp(min=1), levels)).values
    return levels


def initial_codebooks(blocks: torch.Tensor, n_codebooks: int, lloyd_iterations: int = 10) -> torch.Tensor:
    """Blocks [n, L_b] sorted by absolute maximum into N_c equal groups; each codebook a uniform grid over its
    group's range, refined by Lloyd-Max on the group (module docstring)."""
    order = torch.argsort(blocks.abs().amax(dim=-1))
    books = []
    for group in torch.tensor_split(order, n_codebooks):
        values = blocks[group].flatten()
        reach = float(values.abs().max()) if values.numel() else 1.0
        books.append(_lloyd_max(values, torch.linspace(-reach, reach, ENTRIES), lloyd_iterations))
    return torch.stack(books)


def lo_bcq(
    blocks: torch.Tensor, n_codebooks: int, iterations: int = 20, lloyd_iterations: int = 1
) -> tuple[torch.Tensor, list[float]]:
    """LO-BCQ (§2.2) on blocks [n, L_b] (codebook units): returns real-valued codebooks [N_c, 16] and the
    mean squared error per scalar after every assignment step (non-increasing)."""
    codebooks = initial_codebooks(blocks, n_codebooks)
    history = []
    for _ in range(iterations):
        selectors, _, errors = encode_blocks(blocks, codebooks)
        history.append(float(errors.sum()) / blocks.numel())
        for c in range(n_codebooks):
            members = blocks[selectors == c].flatten()
            if members.numel():
                codebooks[c] = _lloyd_max(members, codebooks[c], lloyd_iterations)
    _, _, errors = encode_blocks(blocks, codebooks)
    history.append(float(errors.sum()) / blocks.numel())
    return codebooks, history


def integer_entries(codebooks: torch.Tensor, layout: BCQLayout) -> torch.Tensor:
    """Codebook entries rounded to signed integers of `entry_bits` (the stored codebooks), sorted."""
    return torch.sort(torch.round(codebooks).clamp(-layout.entry_max, layout.entry_max), dim=-1).values


def fake_quantize(x: torch.Tensor, codebooks: torch.Tensor, layout: BCQLayout) -> torch.Tensor:
    """Encode then decode x [..., cols] row by row (activations online: every token its own row)."""
    shape = x.shape
    rows = x.reshape(-1, shape[-1])
    blocks, row_scale, array_scale = normalize(rows, layout)
    values = quantize_blocks(blocks, codebooks).reshape(rows.shape[0], -1, layout.array_len)
    out = (values * array_scale.unsqueeze(-1) * row_scale[:, None, None]).reshape(rows.shape[0], -1)
    return out[:, : shape[-1]].reshape(shape).to(x.dtype)


def sample_blocks(x: torch.Tensor, layout: BCQLayout, count: int, generator: torch.Generator) -> torch.Tensor:
    """Up to `count` normalised blocks of x [rows, cols], drawn without replacement. Normalisation is per row, so
    only the rows the draw touches are normalised (the same blocks as normalising all of x: at every decoder
    linear's input on 16 × 2048 calibration tokens that was most of the codebook design's time)."""
    per_row = layout.padded(x.shape[1]) // layout.block_len
    total = x.shape[0] * per_row
    if total <= count:
        return normalize(x, layout)[0].reshape(-1, layout.block_len)
    drawn = torch.randperm(total, generator=generator)[:count]
    rows, where = torch.unique(drawn // per_row, return_inverse=True)
    blocks = normalize(x[rows], layout)[0]
    return blocks[where, drawn % per_row]


def activation_blocks(model: nn.Module, windows, layout: BCQLayout, count: int, generator) -> torch.Tensor:
    """Blocks of every decoder linear's input on the calibration windows (per token), `count` in all."""
    linears = list(decoder_linears(model))
    per_call = max(1, count // (len(linears) * max(1, len(windows))))
    drawn: list[torch.Tensor] = []
    hooks = [
        module.register_forward_pre_hook(
            lambda m, args: drawn.append(
                sample_blocks(args[0].reshape(-1, args[0].shape[-1]), layout, per_call, generator)
            )
        )
        for _, _, _, module in linears
    ]
    try:
        with torch.no_grad():
            for window in windows:
                model(window.reshape(1, -1))
    finally:
        for hook in hooks:
            hook.remove()
    return torch.cat(drawn)
