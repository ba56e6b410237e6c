"""OmniQuant (Shao et al., ICLR 2024; code OpenGVLab/OmniQuant `quantize/omniquant.py`): learnable weight clipping,
and for weight-activation bits the learnable equivalent transformation.

Block by block, in order: the FP block's outputs on the FP stream of inputs are the targets; the block with its
linears fake-quantized by learnable weight clipping (`methods.core.lwc`: per (row, group) clip logits) is trained
on the quantized stream of inputs (the outputs of the blocks already quantized) to minimise the mean squared error
to those targets, AdamW on the clip logits (the weights stay as they are); then the block's weights are frozen to
their clipped grids and its outputs become the next block's quantized inputs. Defaults are the code's scripts
(`--lwc`, `--epochs 20`, `--lwc_lr 1e-2`, `--wd 0`, batch 1, 128 calibration windows — at the budget's length: 512
tokens at `ptq-cpu`, the paper's 2048 at `full`).

Weight-activation bits (W4A4, W6A6) add LET (`methods.core.let`, the code's `--let`, `--let_lr 5e-3`, `--alpha
0.5`): channel scales between each norm and the linears it feeds, between v_proj and o_proj and between q and k,
started from SmoothQuant's formula on the FP block's input maxima, trained with the clip logits while the block's
activations (and KV cache, if quantized) go through the `act=` / `kv=` plug-ins behind a straight-through gradient
(the code's per-token dynamic activations are `act=rtn`; the code's are asymmetric: `act.sym=false`), then folded
into the norms and weights before the weights freeze. LET is built for the Llama family: Gemma-3 normalises q and k
per head after projection (q_norm, k_norm), so the q/k scale does not commute there, and multiplies by (1 + w) in
its norms; those settings are refused. `method.let=false` trains LWC alone with the plug-ins in the loop.

Other choices of this implementation: the order of the calibration batches inside an epoch is the shared trainer's
seeded draw (the code walks them in order); training runs in fp32 (the code trains under fp16 autocast on a GPU);
the per-group layout and zero clamp of `methods.core.lwc`; the GQA and RoPE choices of `methods.core.let`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from methods.base import QuantContext, QuantSummary, Request, UnsupportedBits
from methods.core.arch import arch_of
from methods.core.bits import BitSpec, check_integer_weight_bits
from methods.core.calibrate import BlockInputs, capture_block_inputs, run_block
from methods.core.let import LET_PARAMETERS, attach_let, fold_let, record_input_maxima
from methods.core.lwc import CLIP_INIT, LWCQuantizer
from methods.core.params import flag, valid
from methods.core.qat import TrainableQLinear, convert, prepare
from methods.core.straight_through import straight_through_plugins
from methods.core.trainer import ParamGroup, TrainSettings, train


@dataclass(frozen=True)
class OmniQuantConfig:
    epochs: int = valid(20, ge=0)  # 0: LWC at its initial clip (σ(4) ≈ 0.982 of min/max), no training
    lwc_lr: float = valid(1e-2, gt=0)
    weight_decay: float = valid(0.0, ge=0)
    calib_batch_size: int = valid(1, ge=1)  # calibration windows per training step (the code's batch 1)
    clip_init: float = valid(CLIP_INIT)
    let: bool = flag(True)  # acts only when the bits quantize activations (the code's W4A4/W6A6 scripts)
    let_lr: float = valid(5e-3, gt=0)
    alpha: float = valid(0.5, ge=0, le=1)  # SmoothQuant's migration strength for LET's starting scales


def supports(request: Request) -> None:
    check_integer_weight_bits(request.bits, "omniquant", UnsupportedBits)
    if request.bits.quantizes_activations and request.arch.family != "llama":
        raise UnsupportedBits(
            "omniquant: its learnable equivalent transformation (weight-activation bits) is built for the Llama "
            "family; Gemma-3's per-head q/k norms and (1 + w) norms do not commute with it (methods/omniquant.py)"
        )


def _in_loop(bits: BitSpec) -> bool:
    """The act/KV plug-ins train inside the block loop when the bits quantize activations (LET's setting)."""
    return bits.quantizes_activations


def _train_block(block: nn.Module, inputs: BlockInputs, targets: list[torch.Tensor], cfg: OmniQuantConfig, seed: int):
    """(first-epoch mean loss, last-epoch mean loss) of training the block's clip logits."""
    batches = len(inputs.hidden)

    def loss(module: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        i = int(batch[0, 0])
        out = module(inputs.hidden[i], **inputs.kwargs[i])
        return F.mse_loss(out[0] if isinstance(out, tuple) else out, targets[i])

    # The trainer draws rows of a [windows, tokens] tensor; here a row names a captured batch (its value).
    rows = torch.arange(batches)[:, None].expand(-1, inputs.hidden[0].shape[0] * inputs.hidden[0].shape[1])
    groups = [ParamGroup(r"weight_quantizer\.(upper|lower)$", cfg.lwc_lr, cfg.weight_decay)]
    if hasattr(block, "let"):
        groups.append(ParamGroup(LET_PARAMETERS, cfg.let_lr, cfg.weight_decay))
    settings = TrainSettings(
        steps=cfg.epochs * batches,
        batch_size=1,
        groups=tuple(groups),
        schedule="constant",
        seed=seed,
    )
    losses = train(block, loss, rows, settings).losses
    return sum(losses[:batches]) / batches, sum(losses[-batches:]) / batches


def quantize(model: nn.Module, cfg: OmniQuantConfig, bits: BitSpec, ctx: QuantContext) -> QuantSummary:
    if not bits.quantizes_weights:
        return QuantSummary()
    windows = ctx.calibration()
    arch = arch_of(model)
    fp_layers = copy.deepcopy(arch.layers(model)).requires_grad_(False)  # the targets' blocks, before any quantizer
    use_let = cfg.let and bits.quantizes_activations
    if _in_loop(bits):
        for plugin in (ctx.act, ctx.kv):  # before prepare: the trainable linears keep the quantizer they find
            if plugin is not None:
                plugin.attach(model)
    prepare(model, lambda name, weight: LWCQuantizer(weight, int(bits.w), bits.group, cfg.clip_init))
    if _in_loop(bits):
        straight_through_plugins(model)
    for param in model.parameters():
        param.requires_grad_(False)
    start, block_kwargs = capture_block_inputs(model, windows, cfg.calib_batch_size)
    fp_hidden, quant_hidden = start.hidden, start.hidden
    first, last = [], []
    for index, block in enumerate(arch.layers(model)):
        kwargs = block_kwargs[index]
        with torch.no_grad():
            maxima, handles = record_input_maxima(fp_layers[index], arch) if use_let else ({}, [])
            targets = run_block(fp_layers[index], BlockInputs(fp_hidden, kwargs))
            for handle in handles:
                handle.remove()
        if use_let:
            attach_let(block, arch, model.config, maxima, cfg.alpha)
        if cfg.epochs > 0 and any(isinstance(m, TrainableQLinear) for m in block.modules()):
            before, after = _train_block(block, BlockInputs(quant_hidden, kwargs), targets, cfg, ctx.seed + index)
            first.append(before)
            last.append(after)
        if use_let:
            fold_let(block, arch)
        with torch.no_grad():
            quant_hidden = run_block(block, BlockInputs(quant_hidden, kwargs))
        fp_hidden = targets
        fp_layers[index] = nn.Identity()  # done with it
    convert(model)
    summary = QuantSummary()
    if first:
        summary.metrics = {"omniquant.block_mse_first_epoch": sum(first) / len(first)}
        summary.metrics["omniquant.block_mse_last_epoch"] = sum(last) / len(last)
        summary.artifacts["omniquant_block_mse.tsv"] = "block\tfirst_epoch\tlast_epoch\n" + "".join(
            f"{i}\t{a:.6g}\t{b:.6g}\n" for i, (a, b) in enumerate(zip(first, last, strict=True))
        )
    return summary
