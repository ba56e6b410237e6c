"""OmniQuant, weight-only (Shao et al., ICLR 2024; code OpenGVLab/OmniQuant `quantize/omniquant.py`).

Block by block, in order: the FP block's outputs on the FP stream of inputs are the targets; the block with its
linears fake-quantized by learnable weight clipping (`methods.core.lwc`: per (row, group) clip logits) is trained
on the quantized stream of inputs (the outputs of the blocks already quantized) to minimise the mean squared error
to those targets, AdamW on the clip logits only (the weights stay as they are); then the block's weights are frozen
to their clipped grids and its outputs become the next block's quantized inputs. Defaults are the code's weight-only
scripts (`--lwc`, `--epochs 20`, `--lwc_lr 1e-2`, `--wd 0`, batch 1, 128 calibration windows — at the budget's
length: 512 tokens at `ptq-cpu`, the paper's 2048 at `full`).

Built: weight-only bits (the code runs weight-only with LWC alone). Not built yet: the learnable equivalent
transformation (LET) the code adds for weight-activation bits (W4A4, W6A6); those settings are refused before any
model loads. Choices of this implementation: the order of the calibration batches inside an epoch is the shared
trainer's seeded draw (the code walks them in order); training runs in fp32 (the code trains under fp16 autocast
on a GPU); the per-group layout and zero clamp of `methods.core.lwc`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from methods.base import QuantContext, QuantSummary, Request, UnsupportedBits
from methods.core.arch import arch_of
from methods.core.bits import BitSpec, check_integer_weight_bits
from methods.core.calibrate import BlockInputs, capture_block_inputs, run_block
from methods.core.lwc import CLIP_INIT, LWCQuantizer
from methods.core.params import valid
from methods.core.qat import TrainableQLinear, convert, prepare
from methods.core.trainer import ParamGroup, TrainSettings, train


@dataclass(frozen=True)
class OmniQuantConfig:
    epochs: int = valid(20, ge=0)  # 0: LWC at its initial clip (σ(4) ≈ 0.982 of min/max), no training
    lwc_lr: float = valid(1e-2, gt=0)
    weight_decay: float = valid(0.0, ge=0)
    calib_batch_size: int = valid(1, ge=1)  # calibration windows per training step (the code's batch 1)
    clip_init: float = valid(CLIP_INIT)


def supports(request: Request) -> None:
    check_integer_weight_bits(request.bits, "omniquant", UnsupportedBits)
    if request.bits.quantizes_activations:
        raise UnsupportedBits(
            "omniquant: weight-only (LWC) is built; its learnable equivalent transformation for weight-activation "
            "bits is not yet"
        )


def _set_enabled(block: nn.Module, enabled: bool) -> None:
    for module in block.modules():
        if isinstance(module, LWCQuantizer):
            module.enabled = enabled


def _train_block(block: nn.Module, inputs: BlockInputs, targets: list[torch.Tensor], cfg: OmniQuantConfig, seed: int):
    """(first-epoch mean loss, last-epoch mean loss) of training the block's clip logits."""
    batches = len(inputs.hidden)

    def loss(module: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        i = int(batch[0, 0])
        out = module(inputs.hidden[i], **inputs.kwargs[i])
        return F.mse_loss(out[0] if isinstance(out, tuple) else out, targets[i])

    # The trainer draws rows of a [windows, tokens] tensor; here a row names a captured batch (its value).
    rows = torch.arange(batches)[:, None].expand(-1, inputs.hidden[0].shape[0] * inputs.hidden[0].shape[1])
    settings = TrainSettings(
        steps=cfg.epochs * batches,
        batch_size=1,
        groups=(ParamGroup(r"weight_quantizer\.(upper|lower)$", cfg.lwc_lr, cfg.weight_decay),),
        schedule="constant",
        seed=seed,
    )
    losses = train(block, loss, rows, settings).losses
    return sum(losses[:batches]) / batches, sum(losses[-batches:]) / batches


def quantize(model: nn.Module, cfg: OmniQuantConfig, bits: BitSpec, ctx: QuantContext) -> QuantSummary:
    if not bits.quantizes_weights:
        return QuantSummary()
    windows = ctx.calibration()
    prepare(model, lambda name, weight: LWCQuantizer(weight, int(bits.w), bits.group, cfg.clip_init))
    for param in model.parameters():
        param.requires_grad_(False)
    start, block_kwargs = capture_block_inputs(model, windows, cfg.calib_batch_size)
    fp_hidden, quant_hidden = start.hidden, start.hidden
    first, last = [], []
    for index, block in enumerate(arch_of(model).layers(model)):
        kwargs = block_kwargs[index]
        with torch.no_grad():
            _set_enabled(block, False)
            targets = run_block(block, BlockInputs(fp_hidden, kwargs))
            _set_enabled(block, True)
        if cfg.epochs > 0 and any(isinstance(m, TrainableQLinear) for m in block.modules()):
            before, after = _train_block(block, BlockInputs(quant_hidden, kwargs), targets, cfg, ctx.seed + index)
            first.append(before)
            last.append(after)
        with torch.no_grad():
            quant_hidden = run_block(block, BlockInputs(quant_hidden, kwargs))
        fp_hidden = targets
    convert(model)
    summary = QuantSummary()
    if first:
        summary.metrics = {"omniquant.block_mse_first_epoch": sum(first) / len(first)}
        summary.metrics["omniquant.block_mse_last_epoch"] = sum(last) / len(last)
        summary.artifacts["omniquant_block_mse.tsv"] = "block\tfirst_epoch\tlast_epoch\n" + "".join(
            f"{i}\t{a:.6g}\t{b:.6g}\n" for i, (a, b) in enumerate(zip(first, last, strict=True))
        )
    return summary
