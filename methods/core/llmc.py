"""llm-compressor (vLLM's maintained quantization library) as a peer engine: hand it our model and our calibration
windows, let its `oneshot` run a recipe, and store what it computed as our `QuantizedWeight`.

Used by the peer methods (issue 46) `awq` and `gptq_llmc`. The library is imported lazily: it lives in its own
environment (`nox -s llmc`; it pins transformers <= 5.17 and auto-round <= 0.15.1, below our lock).

What this adapter does beyond calling the library, and why:
- **Our windows, in order.** The library gets a `DataLoader` over exactly the harness's calibration windows (batch
  1, no shuffling, `num_calibration_samples` = their count), so a peer row and ours see the same token ids
  (`calibration_loader`; a test hooks the embedding to compare).
- **The config on disk.** `oneshot` re-reads the model's config from `config.name_or_path` to refuse checkpoints
  quantized in another format; our in-memory models have no such path, so the config is saved to a temporary
  directory for the call and the attribute restored after.
- **CPU-only machines.** llm-compressor 0.14's AWQ pins its cached activations to page-locked memory before the
  grid search, which needs an accelerator; with none, pinning is skipped (`_no_pinning`). Pinning only speeds
  host-to-device copies: the values are unchanged.
- **Codes from the library's own quantizer.** After `oneshot`, each targeted linear carries `weight_scale`,
  `weight_zero_point` and its `QuantizationArgs`; the codes are `compressed_tensors.quantization.quantize` of the
  (possibly AWQ-scaled or GPTQ-updated) weight with them, so dequantizing our format gives the library's own
  fake-quantized weight (`weights_from_library`, tested). compressed-tensors keeps signed codes and zero points
  (int4: [-8, 7]); ours are unsigned for asymmetric grids, so both are shifted by 2^(b-1). Scales stay in the
  model's dtype, as our own methods keep them, and count 16 bits each.
- **The library's forward wrappers go with its modules.** Every targeted linear is replaced by our `QLinear`, so
  the evaluator runs our fake-quant forward, not the library's.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader

from methods.core.arch import decoder_linears
from methods.core.formats import QuantizedWeight
from methods.core.qlinear import set_quantized_weight

LIBRARY = "llmcompressor"
ENVIRONMENT = "llmc"  # the nox session that installs it (noxfile.py)


def quantization_scheme(bits: int, group_size: int | None, sym: bool, observer: str | None = None):
    """compressed-tensors' scheme for integer weights (per output channel when `group_size` is None) on every
    Linear; activations untouched (the harness's act= plug-ins quantize those)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    args = {"num_bits": bits, "type": "int", "symmetric": sym}
    args.update({"strategy": "group", "group_size": group_size} if group_size else {"strategy": "channel"})
    if observer is not None:
        args["observer"] = observer
    return QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**args))


def check_group_divides(model: nn.Module, group_size: int | None) -> None:
    """The library refuses groups that do not divide a linear's input width (its kernels need whole groups); say so
    in one line, naming the widths and a group that fits, before its calibration starts."""
    if group_size is None:
        return
    widths = sorted({linear.in_features for _, _, _, linear in decoder_linears(model)})
    ragged = [w for w in widths if w % group_size and w >= group_size]
    if ragged:
        fits = [g for g in (32, 64, 128, 256) if all(w % g == 0 for w in widths)]
        hint = f"g{max(fits)}" if fits else "per channel (no g)"
        raise ValueError(
            f"llm-compressor quantizes whole groups only: input widths {ragged} are not multiples of {group_size}; "
            f"use {hint} for this model"
        )


def calibration_loader(windows: list[torch.Tensor]) -> DataLoader:
    """Our windows ([1, seqlen] token ids each), one per batch, in our order."""
    rows = [{"input_ids": w.reshape(-1), "attention_mask": torch.ones(w.numel(), dtype=torch.long)} for w in windows]
    return DataLoader(rows, batch_size=1, shuffle=False)


@contextlib.contextmanager
def _config_on_disk(model: nn.Module) -> Iterator[None]:
    before = model.config.name_or_path
    with tempfile.TemporaryDirectory(prefix="quantbench-llmc-") as directory:
        model.config.save_pretrained(directory)
        model.config.name_or_path = directory
        try:
            yield
        finally:
            model.config.name_or_path = before


@contextlib.contextmanager
def _no_pinning() -> Iterator[None]:
    if torch.cuda.is_available():
        yield
        return
    from unittest import mock

    from llmcompressor.pipelines.cache import IntermediatesCache

    with mock.patch.object(IntermediatesCache, "_pin_intermediate", classmethod(lambda cls, intermediate: None)):
        yield


def run_oneshot(model: nn.Module, windows: list[torch.Tensor], tokenizer, recipe: list) -> None:
    """The library's `oneshot` on our model (in place) with our windows and the given modifiers."""
    from llmcompressor import oneshot
    from llmcompressor.core import reset_session

    with _config_on_disk(model), _no_pinning():
        oneshot(
            model=model,
            processor=tokenizer,
            recipe=recipe,
            dataset=calibration_loader(windows),
            num_calibration_samples=len(windows),
            shuffle_calibration_samples=False,
        )
    reset_session()


def weight_from_library(linear: nn.Module) -> QuantizedWeight:
    """One linear as the library left it, in our format (module docstring)."""
    from compressed_tensors.quantization import quantize

    args = linear.quantization_scheme.weights
    bits, sym = args.num_bits, args.symmetric
    weight = linear.weight.detach()
    scale, zero = linear.weight_scale.detach(), linear.weight_zero_point.detach()
    codes = quantize(weight, scale, zero, args, dtype=torch.int16)
    columns = weight.shape[1]
    group = args.group_size if args.group_size else columns
    scales = scale.reshape(weight.shape[0], -1).float()
    zeros = zero.reshape(weight.shape[0], -1).float()
    if sym:
        return QuantizedWeight(codes.to(torch.int8), scales, torch.zeros_like(zeros), bits, True, group)
    offset = 2 ** (bits - 1)
    return QuantizedWeight((codes + offset).to(torch.uint8), scales, zeros + offset, bits, False, group)


def library_fake_quant(linear: nn.Module) -> torch.Tensor:
    """The library's own fake-quantized weight (what its forward multiplies by), for the format test."""
    from compressed_tensors.quantization import fake_quantize

    return fake_quantize(
        linear.weight.detach(), linear.weight_scale, linear.weight_zero_point, linear.quantization_scheme.weights
    )


def weights_from_library(model: nn.Module) -> int:
    """Replace every decoder linear the library quantized by our QLinear holding its codes; returns the count."""
    replaced = 0
    for _, parent, attr, linear in list(decoder_linears(model)):
        if getattr(linear, "quantization_scheme", None) is None:
            continue
        set_quantized_weight(parent, attr, linear, weight_from_library(linear))
        replaced += 1
    return replaced


def library_version() -> str:
    from importlib.metadata import version

    return version(LIBRARY)
