"""QuIP# (Tseng, Chee, Sun, Kuleshov, De Sa; ICML 2024, arXiv 2402.04396; code Cornell-RelaxML/quip-sharp):
2-bit weights from the randomized Hadamard transform, BlockLDLQ and the E8P lattice codebook; 3 and 4 bits by
residual vector quantization (E8P + E8-1bit, E8P + E8P).

Per decoder linear, block by block on the calibration windows (the loop GPTQ and QuIP share):
1. H ← H / mean(diag H) + `damp`·I (the code's `regularize_H`, sigma_reg 0.01);
2. optional diagonal rescaling (`rescale`, the code's `--rescale_WH`, off by default there and here);
3. incoherence by the randomized Hadamard transform on both sides (§3): W ← (H_m S_U) W (H_n S_V)ᵀ,
   H ← (H_n S_V) H (H_n S_V)ᵀ, seeded signs; Hadamards of order 576 = 36·16, 1536 = 12·128, 192 = 12·16, Gemma's
   640 = 20·32 are exact (`methods.core.hadamard`);
4. the scale: W / (RMS(W) / s) with the codebook's MSE-optimal scale on Gaussian data, s = 1.03 (2 and 4 bit)
   or 0.98 (3 bit) (`scale` overrides it; the authors' README suggests 0.9 for 2-bit E8P);
5. BlockLDLQ (§4.1) over 8-column blocks onto E8P (`methods.core.e8p`: 65,536 vectors of E8 + ¼, a 16-bit
   index per 8 weights; at 3/4 bits plus the residual stage), last block first; then `tune_passes` block
   coordinate-descent passes (the code's `quip_tune_iters`, default 10 there; 0 here: each pass costs about
   twice BlockLDLQ itself on this CPU);
6. undo the transforms; the stored format `E8PWeight` counts 2/3/4 bits per weight + scale + seeds.

7. optional end-to-end fine-tuning (§5, second stage; the code's `finetune_e2e_llama.py`), `finetune_epochs` > 0:
   with every code frozen, train the sign vectors S_U, S_V as real vectors (lr `finetune_susv_lr`, the code's
   ft_susv_lr 1e-4), the norms' weights and lm_head (lr `finetune.lr`, ft_lr 1e-5; on a tied-embedding model
   lm_head *is* the embedding, so it trains too — `finetune_lm_head=false` keeps it frozen) with Adam at a
   constant rate to minimise the cross-entropy against the FP model's next-token distribution (soft targets;
   the same gradient as KL(P_FP ‖ P_Q)) on the calibration windows (the code's devset), `finetune_valid`
   windows held out; the state with the lowest held-out loss after each epoch (or the start) is kept, as the
   code's best_sd. Scaling S_U, S_V is scaling the rows and columns of the dequantized weight
   (`methods.core.gains`), so training never re-runs the Hadamards; the learned vectors are stored as fp16 in the
   format, as the authors store them. Batch 1 window per step here (the code: 8 × 4096); no early stop (the
   code stops after 3 worse epochs; with its best-state rule that only saves time).

Left out, said so: the first fine-tuning stage (§5: within each decoder block, after each linear is quantized,
tune the block's not-yet-quantized linears and the quantized ones' sign vectors to the FP block's outputs); the
code's fusion of q/k/v and gate/up into one matrix (each linear is quantized on its own here); a GPU kernel (CPU
reference decode).
"""

from __future__ import annotations

import copy
import re
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from methods.base import QuantContext, QuantSummary, Request, UnsupportedBits
from methods.core import e8p, gains
from methods.core.arch import decoder_linears
from methods.core.bits import BitSpec
from methods.core.formats import E8PWeight
from methods.core.gptq import quantize_layerwise, reconstruction_error
from methods.core.incoherence import block_ldlq, process, rescale_factors
from methods.core.losses import LossSettings, distillation
from methods.core.orthogonal import RandomizedHadamard
from methods.core.qlinear import QLinear
from methods.core.quantizers import WeightQuantizer
from methods.core.trainer import LoopConfig, ParamGroup, TrainSettings, group_parameters, train


@dataclass(frozen=True)
class QuIPSharpConfig:
    damp: float = 0.01  # H / mean(diag H) + damp·I (the code's sigma_reg)
    rescale: bool = False  # the diagonal rescaling (the code's --rescale_WH)
    scale: float | None = None  # weights / (RMS / scale) before rounding; None = the codebook's (1.03 / 0.98 / 1.03)
    tune_passes: int = 0  # block coordinate-descent passes after BlockLDLQ (the code: 10)
    calib_batch_size: int = 4
    true_sequential: bool = False
    sink_weight: float = 1.0
    finetune_epochs: int = 0  # end-to-end fine-tuning passes over the calibration windows (0 = none; step 7)
    finetune_valid: int = 2  # calibration windows held out to pick the best epoch (the code's ft_valid_size)
    finetune_susv_lr: float = 1e-4  # sign vectors (the code's ft_susv_lr)
    finetune_lm_head: bool = True  # the code tunes lm_head with the norms
    finetune: LoopConfig = field(
        default_factory=lambda: LoopConfig(batch_size=1, lr=1e-5, schedule="constant", checkpoint_every=0)
    )  # lr: norms and lm_head (the code's ft_lr); steps are set by finetune_epochs


def supports(request: Request) -> None:
    bits = request.bits
    if bits.w not in e8p.RVQ:
        raise UnsupportedBits(f"quipsharp has E8P codebooks for 2, 3 and 4 bits: use w2, w3 or w4 (got w{bits.w:g})")
    if bits.group:
        raise UnsupportedBits("quipsharp uses one scale per tensor (RMS / 1.03 after the Hadamards): drop the g<size>")


def _seed(run_seed: int, index: int, name: str, side: str) -> int:
    return zlib.crc32(f"quipsharp:{run_seed}:{index}:{name}:{side}".encode())


def quantize_linear(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    u: RandomizedHadamard,
    v: RandomizedHadamard,
    cfg: QuIPSharpConfig,
    bits: int = 2,
) -> tuple[E8PWeight, list[float]]:
    """Steps 1–6 for one linear; returns the format and the BlockLDLQ objective history (processed basis)."""
    if weight.shape[1] % e8p.DIM:
        raise ValueError(f"quipsharp needs input widths divisible by 8 (got {weight.shape[1]}): use method=quip")
    h = hessian.double() / torch.diagonal(hessian.double()).mean()
    h = h + cfg.damp * torch.eye(h.shape[0], dtype=h.dtype)
    col_scale = (
        rescale_factors(weight, h).half().double() if cfg.rescale else torch.ones(weight.shape[1], dtype=h.dtype)
    )
    w, h = process(weight, h, u, v, col_scale)
    scale = float(w.square().mean().sqrt()) / (cfg.scale or e8p.RVQ[bits][0])
    _, indices, history = block_ldlq(w / scale, h, e8p.rvq_nearest(bits), e8p.DIM, cfg.tune_passes)
    qweight = E8PWeight(indices, scale, u, v, col_scale.half() if cfg.rescale else None, bits)
    return qweight, history


def quantize(model: nn.Module, cfg: QuIPSharpConfig, bits: BitSpec, ctx: QuantContext) -> QuantSummary:
    summary = QuantSummary()
    if not bits.quantizes_weights:
        return summary
    if (cfg.scale is not None and cfg.scale <= 0) or cfg.tune_passes < 0:
        raise ValueError(f"quipsharp needs scale > 0 and tune_passes >= 0 (got {cfg.scale}, {cfg.tune_passes})")
    b = int(bits.w)
    rtn = WeightQuantizer(b, None, sym=False)

    def solve(index: int, name: str, weight: torch.Tensor, hessian: torch.Tensor):
        rows, cols = weight.shape
        u = RandomizedHadamard.random(rows, _seed(ctx.seed, index, name, "u"))
        v = RandomizedHadamard.random(cols, _seed(ctx.seed, index, name, "v"))
        qweight, history = quantize_linear(weight, hessian, u, v, cfg, b)
        metrics = {
            "quipsharp_objective": reconstruction_error(weight, qweight.dequantize(), hessian),
            "rtn_objective": reconstruction_error(weight, rtn.quantize(weight).dequantize(), hessian),
        }
        if cfg.tune_passes:
            metrics["tune_objective_drop"] = history[0] - history[-1]
        return qweight, metrics

    if cfg.finetune_epochs < 0 or cfg.finetune_valid < 1:
        raise ValueError(
            f"quipsharp needs finetune_epochs >= 0 and finetune_valid >= 1 "
            f"(got {cfg.finetune_epochs}, {cfg.finetune_valid})"
        )
    teacher = copy.deepcopy(model).eval().requires_grad_(False) if cfg.finetune_epochs else None
    windows = ctx.calibration()
    if teacher is not None and len(windows) <= cfg.finetune_valid:
        raise ValueError(
            f"quipsharp fine-tuning holds out finetune_valid={cfg.finetune_valid} of {len(windows)} calibration "
            "windows and needs at least one to train on: raise calib.nsamples or lower method.finetune_valid"
        )
    summary.metrics.update(quantize_layerwise(model, windows, cfg, solve, desc="quipsharp"))
    if teacher is not None:
        summary.metrics.update(finetune_end_to_end(model, teacher, torch.cat(windows), cfg, ctx))
    return summary


def _lm_head_name(model: nn.Module) -> str:
    head = model.get_output_embeddings().weight
    return next(name for name, param in model.named_parameters() if param is head)


def finetune_end_to_end(
    model: nn.Module, teacher: nn.Module, windows: torch.Tensor, cfg: QuIPSharpConfig, ctx: QuantContext
) -> dict[str, float]:
    """Step 7: tune sign vectors, norms and lm_head against the FP model; keep the best held-out state."""
    train_windows, valid_windows = windows[: -cfg.finetune_valid], windows[-cfg.finetune_valid :]
    loop = cfg.finetune
    quantized = [m for _, _, _, m in decoder_linears(model) if isinstance(m, QLinear) and m.qweight is not None]
    for module in quantized:
        gains.attach(module)
    groups = [ParamGroup(gains.GAIN_PATTERN, cfg.finetune_susv_lr), ParamGroup(r"norm\.weight$", loop.lr)]
    if cfg.finetune_lm_head:
        groups.append(ParamGroup(rf"^{re.escape(_lm_head_name(model))}$", loop.lr))
    per_epoch = loop.one_pass(train_windows.shape[0])
    settings = TrainSettings(
        steps=cfg.finetune_epochs * per_epoch,
        batch_size=loop.batch_size,
        grad_accum=loop.grad_accum,
        groups=tuple(groups),
        schedule=loop.schedule,
        warmup_steps=loop.warmup_steps,
        max_grad_norm=loop.max_grad_norm,
        seed=ctx.seed,
        checkpoint_every=loop.checkpoint_every,
    )
    loss_settings = LossSettings(chunk=loop.loss_chunk)

    def loss(student: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        return distillation(student, teacher, batch, kind="forward", settings=loss_settings)

    def held_out() -> float:
        with torch.no_grad():
            return sum(float(loss(model, valid_windows[i : i + 1])) for i in range(valid_windows.shape[0])) / len(
                valid_windows
            )

    def snapshot() -> dict[str, torch.Tensor]:
        return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}

    group_parameters(model, settings.groups)  # marks the trainable parameters (train() does it again)
    model.eval()
    first = held_out()
    best = {"loss": first, "epoch": 0.0, "state": snapshot()}

    def on_step(step: int, metrics: dict[str, float]) -> None:
        if ctx.log_step is not None:
            ctx.log_step(step, metrics)
        if (step + 1) % per_epoch == 0:
            model.eval()
            value = held_out()
            model.train()
            if value < best["loss"]:
                best.update(loss=value, epoch=float((step + 1) // per_epoch), state=snapshot())

    checkpoint = Path(ctx.checkpoint_dir) / "quipsharp-finetune.pt" if ctx.checkpoint_dir else None
    try:
        result = train(model, loss, train_windows, settings, checkpoint_path=checkpoint, on_step=on_step)
        trained = dict(model.named_parameters())
        with torch.no_grad():  # the best held-out state (the start's when no epoch beat it)
            for name, value in best["state"].items():
                trained[name].copy_(value)
    except BaseException:
        for module in quantized:
            gains.detach(module)
        raise
    finally:
        for param in model.parameters():
            param.requires_grad_(False)
    if checkpoint is not None:
        checkpoint.unlink(missing_ok=True)
    for module in quantized:
        row, col = gains.detach(module)
        module.qweight = replace(module.qweight, row_gain=row, col_gain=col)
        module.weight.data = module.qweight.dequantize().to(module.weight.dtype)
    return {
        **result.metrics(),
        "finetune_valid_loss_first": first,
        "finetune_valid_loss_best": best["loss"],
        "finetune_best_epoch": best["epoch"],
    }
