"""RCP — Rotate, Clip, and Partition (Choi, Song, Lim, Yoo, arXiv 2502.15779; EMNLP Findings 2025): QAT towards
W2A4KV4 with rotations and a learnable non-uniform weight quantizer.

**Reconstructed from the public description.** The paper's method section, appendix and code were not readable
here (the authors' repository songsm921/RCP holds a README only); what is public: QAT; recent rotations with online
R2–R4; a learnable clipping; Learnable Direct Partitioning (LDP), learnable parameters that directly learn
non-uniform intervals jointly with the weights; a non-uniform W2A4 GEMV kernel; BitDistiller as the QAT recipe it
is compared with. The design below is issue 42's; every open choice is a config option:

1. **Rotate** (`rotation`): QuaRot's rotation (`rotation.quarot_rotate`: randomized-Hadamard R1 fused into the
   weights, R2 per head, online head mixing before o_proj, R4 before down_proj, R3 on queries/keys after RoPE);
   `random` for a random orthogonal R1; `none` for no rotation (the ablation); `spinquant` for SpinQuant's
   learned R1/R2 (`methods.core.learned_rotation`: from QuaRot's start, Cayley SGD on next-token cross-entropy
   with the run's act/KV quantizers in the loop and 16-bit weights, or RTN weights at the run's bits on the
   asymmetric per-channel grid when neither activations nor the KV cache are quantized — SpinQuant's rule;
   `rotation_steps`, `rotation_batch_size`, `rotation_lr`: SpinQuant's trainer defaults 100, 1, 1.5, with its
   cosine decay and gradient-norm clip 1.0), fused, then the same
   online R3/R4 and head mixing; the clip, partition and QAT then start from the learned rotation.
2. **Clip**: per output channel, OmniQuant's LWC form hi = sigmoid(γ)·max(W), lo = sigmoid(β)·min(W)
   (`methods.core.ldp`); γ, β start from BitDistiller's clip search on calibration activations (`clip_init:
   search`, on the rotated model, on the θ = 0 grid) or at a fixed ratio (`clip_init: ratio`, `clip_ratio`,
   OmniQuant's sigmoid(4) ≈ 0.982 by default); `learn_clip=false` freezes them.
3. **Partition** (LDP): 2^b levels per row with gaps (hi − lo)·softmax(θ), θ = 0 at the start (the uniform grid);
   `partition: uniform` freezes θ at 0 (uniform INT-b QAT with the learnable clip: the ablation).
4. **Activations and KV cache** through the act/KV plug-ins with QuaRot's recipe (clip 0.9 / 0.95:
   `conf/act_recipe/rcp-rtn.yaml`, `conf/kv_recipe/rcp-rtn.yaml`), quantized straight-through while training.
5. **Train** on the shared trainer: `loss: cakld` (default; BitDistiller's confidence-aware KL to the FP teacher on
   the teacher's own generations, cached and shared with BitDistiller runs of the same settings), `forward` /
   `reverse` KL, or `ce` (next-token cross-entropy on the training windows); AdamW with one lr for the latent
   weights (`loop.lr`) and one for γ, β, θ (`quantizer_lr`), `loop.*` as every QAT method. The learned levels'
   positions inside [lo, hi] are logged as an artifact (`rcp_levels.csv`).
6. **Format**: b-bit codes + one fp16 table of 2^b levels per row (`LUTWeight`); at 2 bits the LUT GEMM runs it,
   with 4-bit per-token activations `lut_matmul_a` (the W2A4 GEMV).
Open choices beyond the issue's: the row range includes zero (lo ≤ 0 ≤ hi, as the project's asymmetric grids);
ties between two levels go to the lower one; embeddings, lm_head and norms stay 16-bit and frozen; the latent
weights are trained from the rotated FP weights (not pre-clamped); `loop` defaults were picked by the smoke-budget
sweep recorded in conf/method/rcp.yaml.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from methods.base import QuantContext, QuantSummary, Request, UnsupportedBits
from methods.core.arch import decoder_linears
from methods.core.bits import BitSpec
from methods.core.clip_search import ClipSearchSettings, clip_model_weights
from methods.core.ldp import LDPQuantizer, clip_ratios, level_histogram, logit_of, uniform_grid_fake_quant
from methods.core.learned_rotation import RotationLearning, fuse, learn_rotations
from methods.core.losses import KL_KINDS, LossSettings, cross_entropy, distillation, teacher_confidence
from methods.core.params import Valid, added_later, flag, valid
from methods.core.qat import TrainableQLinear, convert, prepare
from methods.core.quantizers import WeightQuantizer
from methods.core.rotation import quarot_rotate, rotation_refusal
from methods.core.selfdistill import GenerationSettings, cached_generations, pack, select_prompts
from methods.core.straight_through import straight_through_plugins
from methods.core.trainer import LoopConfig, ParamGroup, batch_at, train

RCP_BITS = (2, 3, 4)
ROTATIONS = ("hadamard", "random", "spinquant", "none")
PARTITIONS = ("learned", "uniform")
CLIP_INITS = ("search", "ratio")
LOSSES = (*KL_KINDS, "ce")
LATENT_WEIGHTS = r"layers\..*_proj\.weight$"  # the decoder linears' latent weights (norms, embeddings stay frozen)


@dataclass(frozen=True)
class RCPConfig:
    rotation: str = valid("hadamard", choices=ROTATIONS)
    # rotation=spinquant only (SpinQuant's trainer defaults; added after the first RCP runs, whose keys they keep)
    rotation_steps: int = added_later(100, 100, valid=Valid(ge=0))
    rotation_batch_size: int = added_later(1, 1, valid=Valid(ge=1))
    rotation_lr: float = added_later(1.5, 1.5, valid=Valid(gt=0))
    partition: str = valid("learned", choices=PARTITIONS)
    learn_clip: bool = flag(True)
    clip_init: str = valid("search", choices=CLIP_INITS)
    clip_ratio: float = valid(0.982, gt=0, le=1)  # clip_init=ratio: sigmoid(4), OmniQuant's LWC initialisation
    clip_search: ClipSearchSettings = field(default_factory=ClipSearchSettings)
    loss: str = valid("cakld", choices=LOSSES)
    cakld_batches: int = valid(10, ge=1)
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    quantizer_lr: float = valid(
        1e-3, gt=0
    )  # γ, β, θ (conf/method/rcp.yaml: the smoke-budget sweep these defaults come from)
    # weights at 2e-5 (conf/method/rcp.yaml: 5e-4 diverged at W4A4KV4), γ/β/θ at quantizer_lr
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(lr=2e-5, schedule="cosine"))


def supports(request: Request) -> None:
    bits = request.bits
    if bits.w not in RCP_BITS:
        raise UnsupportedBits(f"rcp does not support {bits}: weight bits must be one of 2, 3, 4")
    if bits.group is not None:
        raise UnsupportedBits(f"rcp does not support {bits}: LDP learns one level table per output channel (drop g)")
    refusal = rotation_refusal("rcp", request.arch, request.kv)
    if refusal:
        raise UnsupportedBits(refusal)
    for plugin in (request.act, request.kv):
        if plugin is not None and plugin.needs_calibration:
            raise UnsupportedBits(
                "rcp trains with its act/KV quantizers in the loop, before a plug-in that needs calibration could be "
                "fitted: use act=rtn / kv=rtn"
            )


def _check(cfg: RCPConfig) -> None:
    for name, value, choices in (
        ("rotation", cfg.rotation, ROTATIONS),
        ("partition", cfg.partition, PARTITIONS),
        ("clip_init", cfg.clip_init, CLIP_INITS),
        ("loss", cfg.loss, LOSSES),
    ):
        if value not in choices:
            raise ValueError(f"rcp {name} must be one of {', '.join(choices)}, got {value!r}")
    if not 0 < cfg.clip_ratio <= 1:
        raise ValueError(f"rcp clip_ratio must be in (0, 1], got {cfg.clip_ratio}")


def _starting_clips(model: nn.Module, cfg: RCPConfig, bits: int, ctx: QuantContext, metrics: dict) -> dict:
    """Per linear name, the (hi, lo) clip ratios sigmoid(γ), sigmoid(β) start at."""
    names = [name for name, _, _, _ in decoder_linears(model)]
    if cfg.clip_init == "ratio":
        return {name: (cfg.clip_ratio, cfg.clip_ratio) for name in names}
    originals = {name: module.weight.detach().clone() for name, _, _, module in decoder_linears(model)}
    grid = lambda groups: uniform_grid_fake_quant(groups, bits)  # noqa: E731
    metrics.update(clip_model_weights(model, ctx.calibration(), grid, None, cfg.clip_search))
    ratios = {}
    for name, _, _, module in decoder_linears(model):
        ratios[name] = clip_ratios(originals[name], module.weight.detach())
        module.weight.data = originals[name]  # the latent weight trains from the unclipped one
    return ratios


def _training_windows(teacher, cfg: RCPConfig, ctx: QuantContext, metrics: dict) -> torch.Tensor:
    corpus = ctx.training()
    if cfg.loss == "ce":
        return corpus
    prompts = select_prompts(ctx.training_rows(), cfg.generation, ctx.seed)
    cache = ctx.cache_dir or str(Path(ctx.checkpoint_dir or ".") / "cache")
    sequences, cached = cached_generations(teacher, ctx.tokenizer, prompts, cfg.generation, ctx.seed, cache)
    metrics.update({"selfdistill_prompts": float(len(prompts)), "selfdistill_cached": float(cached)})
    return pack(sequences, corpus.shape[1], ctx.tokenizer.eos_token_id)[: corpus.shape[0]]


def _quantizer_groups(cfg: RCPConfig) -> tuple[ParamGroup, ...]:
    """γ, β (unless `learn_clip=false`) and θ (unless `partition=uniform`) at `quantizer_lr`; the latent weights
    train at `loop.lr`. A parameter no group matches stays frozen."""
    learned = (["gamma", "beta"] if cfg.learn_clip else []) + (["theta"] if cfg.partition == "learned" else [])
    if not learned:
        return ()
    return (ParamGroup(rf"weight_quantizer\.({'|'.join(learned)})$", cfg.quantizer_lr, 0.0),)


def _train(model: nn.Module, teacher, cfg: RCPConfig, ctx: QuantContext, metrics: dict) -> None:
    loop = cfg.loop
    windows = _training_windows(teacher, cfg, ctx, metrics)
    steps = loop.steps if loop.steps is not None else loop.one_pass(windows.shape[0])
    loss_settings = LossSettings(chunk=loop.loss_chunk)
    if cfg.loss == "ce":
        loss_fn = lambda m, batch: cross_entropy(m, batch, settings=loss_settings)  # noqa: E731
    else:
        gamma_batches = [batch_at(windows, k, loop.batch_size, ctx.seed) for k in range(cfg.cakld_batches)]
        confidence = teacher_confidence(teacher, gamma_batches, chunk=loop.loss_chunk)
        metrics["cakld_gamma"] = confidence.gamma
        loss_fn = lambda m, batch: distillation(  # noqa: E731
            m, teacher, batch, cfg.loss, confidence.gamma, settings=loss_settings
        )
    settings = loop.settings(steps, LATENT_WEIGHTS, ctx.seed, _quantizer_groups(cfg))
    checkpoint = Path(ctx.checkpoint_dir) / "rcp.pt" if ctx.checkpoint_dir else None
    result = train(model, loss_fn, windows, settings, checkpoint_path=checkpoint, on_step=ctx.log_step)
    metrics.update(result.metrics())
    if checkpoint is not None:
        checkpoint.unlink(missing_ok=True)


def _rotate(model: nn.Module, cfg: RCPConfig, bits: BitSpec, ctx: QuantContext, metrics: dict) -> dict[str, str]:
    """Step 1; returns the rotation's notes. `spinquant` learns R1/R2 first (module docstring) and logs its steps
    and metrics under `rotation_`, apart from the QAT's."""
    if cfg.rotation == "none":
        return {"rotation": "none"}
    if cfg.rotation != "spinquant":
        return quarot_rotate(model, cfg.rotation, ctx.seed)
    weight_only = bits.quantizes_weights and bits.a >= 16 and bits.kv >= 16
    in_loop = WeightQuantizer(int(bits.w), None, sym=False) if weight_only else None
    checkpoint = Path(ctx.checkpoint_dir) / "rcp-rotations.pt" if ctx.checkpoint_dir else None
    log_step = None
    if ctx.log_step is not None:
        log_step = lambda step, values: ctx.log_step(step, {f"rotation_{k}": v for k, v in values.items()})  # noqa: E731
    loop = LoopConfig(
        steps=cfg.rotation_steps, batch_size=cfg.rotation_batch_size, lr=cfg.rotation_lr, max_grad_norm=1.0
    )
    settings = RotationLearning(loop=loop)  # QuaRot's online R3/R4 and head mixing, as rotation=hadamard has
    rotations, learned = learn_rotations(
        model, settings, (ctx.act, ctx.kv), ctx.training, ctx.seed, in_loop, checkpoint, log_step
    )
    metrics.update({k if k.startswith("rotation_") else f"rotation_{k}": v for k, v in learned.items()})
    notes = fuse(model, rotations, settings.online, settings.o_proj_heads)
    return {
        "r1": "learned (SpinQuant's Cayley SGD from QuaRot's)",
        "loop_weights": "rtn" if in_loop else "none",
        **notes,
    }


def quantize(model: nn.Module, cfg: RCPConfig, bits: BitSpec, ctx: QuantContext) -> QuantSummary:
    _check(cfg)
    metrics: dict[str, float] = {}
    trains = bits.quantizes_weights and cfg.loop.steps != 0
    teacher = copy.deepcopy(model).eval().requires_grad_(False) if trains and cfg.loss != "ce" else None
    notes = _rotate(model, cfg, bits, ctx, metrics)
    if not bits.quantizes_weights:
        return QuantSummary(notes=notes, metrics=metrics)
    w_bits = int(bits.w)
    ratios = _starting_clips(model, cfg, w_bits, ctx, metrics)
    learn_partition = cfg.partition == "learned"
    for plugin in (ctx.act, ctx.kv):  # before prepare: the trainable linears keep the quantizer they find
        if plugin is not None:
            plugin.attach(model)
    prepare(
        model,
        lambda name, weight: LDPQuantizer(weight.shape[0], w_bits, *ratios[name], learn_partition, cfg.learn_clip),
    )
    straight_through_plugins(model)  # the loss reaches the weights through the 4-bit activations and cache
    if trains:
        _train(model, teacher, cfg, ctx, metrics)
    quantizers, weights = {}, {}
    for name, _, _, module in decoder_linears(model):
        if isinstance(module, TrainableQLinear):
            quantizers[name], weights[name] = module.weight_quantizer, module.weight.detach()
    artifacts = {"rcp_levels.csv": level_histogram(quantizers, weights)}
    convert(model)
    model.requires_grad_(False)
    notes["clip_init"] = "search" if cfg.clip_init == "search" else f"γ = β = {logit_of(cfg.clip_ratio):.3f}"
    return QuantSummary(notes=notes, metrics=metrics, artifacts=artifacts)
