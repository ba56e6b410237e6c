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
6. undo the transforms; the stored format `E8PWeight` counts 2/3/4 bits per weight + scale + seeds;
7. optional fine-tuning (§5; the code's `lib/algo/finetune.py`), every code frozen; S_U, S_V become real vectors,
   and since W = S_U (H_mᵀ Ŵ_p H_n) S_V, tuning them is tuning row and column gains of the dequantized weight
   (`methods.core.gains`): training never re-runs the Hadamards, and the learned vectors are stored as fp16 in
   the format, as the authors store them. Both stages keep the state with the lowest held-out loss after any
   epoch or at the start (the code's best_sd; `methods.core.finetune`), with Adam at a constant rate.
   a. per block (`layer_epochs` > 0; the code's quantize_finetune_llama.py, ft_epochs 5): linears are quantized
      in the code's order q/k/v → o → gate/up → down (true-sequential), and after each group but the last, the
      quantized linears' sign vectors (lr `layer_susv_lr`, ft_susv_lr 5e-4) and the block's not-yet-quantized
      linears and norms (lr `layer_lr`, ft_lr 5e-5) are tuned so the block's output matches the FP block's on
      the same inputs (MSE), one captured calibration batch per step, the last batch held out. Deviations: the
      inputs are the quantized earlier blocks' outputs and later groups' Hessians are collected after the
      tuning (the harness's sequential loop), where the code feeds every block the FP model's activations and
      uses offline FP Hessians; no gradient accumulation (the code: 2 × 4 windows per step).
   b. end to end (`e2e_epochs` > 0; the code's finetune_e2e_llama.py): the sign vectors (lr `e2e_susv_lr`,
      ft_susv_lr 1e-4), the norms and lm_head (lr `e2e.lr`, ft_lr 1e-5; on a tied-embedding model lm_head *is*
      the embedding — `e2e_lm_head=false` keeps it frozen) minimise the cross-entropy against the FP model's
      next-token distribution (soft targets; the gradient of KL(P_FP ‖ P_Q)) on the calibration windows (the
      code's devset), `e2e_valid` windows held out; batch 1 window (the code: 8 × 4096 tokens).

Left out, said so: the code's fusion of q/k/v and gate/up into one matrix (each linear is quantized on its own
here); a GPU kernel (CPU reference decode).
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
from methods.core.arch import arch_of, decoder_linears
from methods.core.bits import BitSpec
from methods.core.calibrate import run_block
from methods.core.finetune import train_keep_best, tune_block_outputs
from methods.core.formats import E8PWeight
from methods.core.gptq import quantize_layerwise, reconstruction_error
from methods.core.incoherence import block_ldlq, process, rescale_factors
from methods.core.losses import LossSettings, distillation
from methods.core.orthogonal import RandomizedHadamard
from methods.core.params import flag, valid
from methods.core.qlinear import QLinear
from methods.core.quantizers import WeightQuantizer
from methods.core.trainer import LoopConfig, ParamGroup, TrainSettings


@dataclass(frozen=True)
class QuIPSharpConfig:
    damp: float = valid(0.01, gt=0)  # H / mean(diag H) + damp·I (the code's sigma_reg)
    rescale: bool = flag(False)  # the diagonal rescaling (the code's --rescale_WH)
    scale: float | None = valid(
        None, gt=0, none=True
    )  # weights / (RMS / scale) before rounding; None = the codebook's (1.03 / 0.98 / 1.03)
    tune_passes: int = valid(0, ge=0)  # block coordinate-descent passes after BlockLDLQ (the code: 10)
    calib_batch_size: int = valid(4, ge=1)
    true_sequential: bool = flag(False)
    sink_weight: float = valid(1.0, ge=0)
    layer_epochs: int = valid(0, ge=0)  # per-block fine-tuning epochs (step 7a; 0 = none, the code's default: 5)
    layer_lr: float = valid(5e-5, gt=0)  # the block's unquantized linears and norms (the code's ft_lr)
    layer_susv_lr: float = valid(5e-4, ge=0)  # sign vectors (the code's ft_susv_lr)
    e2e_epochs: int = valid(0, ge=0)  # end-to-end fine-tuning passes over the calibration windows (step 7b; 0 = none)
    e2e_valid: int = valid(2, ge=1)  # calibration windows held out to pick the best epoch (the code's ft_valid_size)
    e2e_susv_lr: float = valid(1e-4, ge=0)  # sign vectors (the code's ft_susv_lr for finetune_e2e)
    e2e_lm_head: bool = flag(True)  # the code tunes lm_head with the norms
    e2e: LoopConfig = field(
        default_factory=lambda: LoopConfig(batch_size=1, lr=1e-5, schedule="constant", checkpoint_every=0)
    )  # lr: norms and lm_head (the code's ft_lr); steps are set by e2e_epochs


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

    if min(cfg.layer_epochs, cfg.e2e_epochs) < 0 or cfg.e2e_valid < 1:
        raise ValueError(
            f"quipsharp needs layer_epochs >= 0, e2e_epochs >= 0 and e2e_valid >= 1 "
            f"(got {cfg.layer_epochs}, {cfg.e2e_epochs}, {cfg.e2e_valid})"
        )
    tuning = cfg.layer_epochs > 0 or cfg.e2e_epochs > 0
    teacher = copy.deepcopy(model).eval().requires_grad_(False) if tuning else None
    windows = ctx.calibration()
    if cfg.e2e_epochs and len(windows) <= cfg.e2e_valid:
        raise ValueError(
            f"quipsharp fine-tuning holds out e2e_valid={cfg.e2e_valid} of {len(windows)} calibration "
            "windows and needs at least one to train on: raise calib.nsamples or lower method.e2e_valid"
        )
    after_group = _block_tuner(teacher, cfg, ctx.seed) if cfg.layer_epochs else None
    settings = replace(cfg, true_sequential=True) if cfg.layer_epochs else cfg
    summary.metrics.update(
        quantize_layerwise(model, windows, settings, solve, desc="quipsharp", after_group=after_group)
    )
    if cfg.e2e_epochs:
        summary.metrics.update(finetune_end_to_end(model, teacher, torch.cat(windows), cfg, ctx))
    return summary


def _fold_gains(module: QLinear) -> None:
    """Detach the module's gains into its format (composing with gains an earlier stage stored)."""
    row, col = gains.detach(module)
    q = module.qweight
    if q.row_gain is not None:
        row, col = (q.row_gain.float() * row.float()).half(), (q.col_gain.float() * col.float()).half()
    module.qweight = replace(q, row_gain=row, col_gain=col)
    module.weight.data = module.qweight.dequantize().to(module.weight.dtype)


def _block_tuner(teacher: nn.Module, cfg: QuIPSharpConfig, seed: int):
    """Step 7a as `quantize_layerwise`'s after_group hook."""
    teacher_layers = arch_of(teacher).layers(teacher)
    targets: dict[int, list[torch.Tensor]] = {}

    def after_group(index, block, inputs, places, done, last) -> dict[str, float]:
        modules = {name: getattr(*places[name]) for name in places}
        if last:  # the code tunes after every group but the last; fold what was learned into the formats
            for name in done:
                if hasattr(modules[name], "parametrizations"):
                    _fold_gains(modules[name])
            targets.pop(index, None)
            return {}
        for name in done:
            if not hasattr(modules[name], "parametrizations"):
                gains.attach(modules[name])
        if index not in targets:
            with torch.no_grad():
                targets[index] = run_block(teacher_layers[index], inputs)
        pending = {id(modules[name].weight) for name in places if name not in done}
        linear_names = [n for n, p in block.named_parameters() if id(p) in pending]
        groups = [ParamGroup(gains.GAIN_PATTERN, cfg.layer_susv_lr), ParamGroup(r"norm\.weight$", cfg.layer_lr)]
        if linear_names:
            groups.append(ParamGroup("^(" + "|".join(re.escape(n) for n in linear_names) + ")$", cfg.layer_lr))
        outcome = tune_block_outputs(block, inputs, targets[index], tuple(groups), cfg.layer_epochs, seed)
        return {
            "layer_ft_mse_first": outcome.first,
            "layer_ft_mse_best": outcome.best,
            "layer_ft_seconds": outcome.result.seconds,
            "layer_ft_tokens": float(outcome.result.tokens),
        }

    return after_group


def _lm_head_name(model: nn.Module) -> str:
    head = model.get_output_embeddings().weight
    return next(name for name, param in model.named_parameters() if param is head)


def finetune_end_to_end(
    model: nn.Module, teacher: nn.Module, windows: torch.Tensor, cfg: QuIPSharpConfig, ctx: QuantContext
) -> dict[str, float]:
    """Step 7b: tune sign vectors, norms and lm_head against the FP model; keep the best held-out state."""
    train_windows, valid_windows = windows[: -cfg.e2e_valid], windows[-cfg.e2e_valid :]
    loop = cfg.e2e
    quantized = [m for _, _, _, m in decoder_linears(model) if isinstance(m, QLinear) and m.qweight is not None]
    for module in quantized:
        gains.attach(module)
    groups = [ParamGroup(gains.GAIN_PATTERN, cfg.e2e_susv_lr), ParamGroup(r"norm\.weight$", loop.lr)]
    if cfg.e2e_lm_head:
        groups.append(ParamGroup(rf"^{re.escape(_lm_head_name(model))}$", loop.lr))
    per_epoch = loop.one_pass(train_windows.shape[0])
    settings = TrainSettings(
        steps=cfg.e2e_epochs * per_epoch,
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
        return sum(float(loss(model, valid_windows[i : i + 1])) for i in range(len(valid_windows))) / len(valid_windows)

    checkpoint = Path(ctx.checkpoint_dir) / "quipsharp-e2e.pt" if ctx.checkpoint_dir else None
    try:
        outcome = train_keep_best(
            model, loss, train_windows, settings, held_out, per_epoch, ctx.log_step, checkpoint_path=checkpoint
        )
    finally:
        for module in quantized:
            _fold_gains(module)
    if checkpoint is not None:
        checkpoint.unlink(missing_ok=True)
    return {
        **outcome.result.metrics(),
        "e2e_valid_loss_first": outcome.first,
        "e2e_valid_loss_best": outcome.best,
        "e2e_best_epoch": float(outcome.best_epoch),
    }
