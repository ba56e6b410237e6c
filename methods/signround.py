"""SignRound (Cheng et al., arXiv 2309.05516) through Intel's `auto-round` library — wrapped, not re-implemented.

Block by block, auto-round tunes a rounding offset V ∈ [−0.5, 0.5] per weight and min/max clipping scales
per group with signed gradient descent (paper §3, Eq. 4–6) to minimise the block's output error on
calibration data. We hand it the harness's own seeded calibration windows (the same ones GPTQ/QuaRot get,
not auto-round's hub dataset), then take back its fake-quantized (QDQ) weights, which are what we evaluate;
its per-group `scale`/`zp` become our `QuantizedWeight` for memory accounting and packing. Activations and
the KV cache, when the bit string asks, come from the `act=` / `kv=` plug-ins.

Defaults are the paper's (§4.1): 200 iterations, lr = minmax_lr = 1/iters, 512 samples of 2048 tokens,
batch 8, asymmetric weights (auto-round's own default is now symmetric), plain RTN initialisation
(`disable_opt_rtn`; auto-round's later "optimized RTN" init is not in the paper).

Conventions measured against ours (tests/test_signround.py): auto-round's asymmetric grid is ours, except
that the scale is rounded to fp16 before the zero point and the codes are computed; its symmetric grid is
llama.cpp's "full range" one (scale = signed max / 2^(b−1), codes in [−2^(b−1), 2^(b−1) − 1]), not the
GPTQ/QuaRot one (scale = max|w| / (2^(b−1) − 1)) that our `rtn` uses.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from methods.base import QuantContext, QuantSummary, Request, UnsupportedBits
from methods.core.arch import decoder_linears
from methods.core.bits import BitSpec
from methods.core.formats import QuantizedWeight
from methods.core.params import flag, valid
from methods.core.qlinear import QLinear

SIGNROUND_WEIGHT_BITS = (2, 3, 4, 8, 16)
INSTALL = "pip install 'quantbench[autoround]'"


@dataclass(frozen=True)
class SignRoundConfig:
    iters: int = valid(200, ge=0)
    lr: float | None = valid(None, gt=0, none=True)  # None = 1 / iters (paper)
    minmax_lr: float | None = valid(None, gt=0, none=True)  # None = lr (paper)
    batch_size: int = valid(8, ge=1)
    w_sym: bool = flag(False)
    disable_opt_rtn: bool = flag(True)
    amp: bool = flag(False)  # auto-round's default casts the model to bf16; we keep fp32 (our evaluation dtype)
    enable_torch_compile: bool | None = valid(
        None, choices=(False, True), none=True
    )  # None = auto-round's choice (compiles the block when iters >= 10)


def auto_round_version() -> str:
    try:
        from importlib.metadata import version

        return version("auto-round")
    except Exception as err:  # PackageNotFoundError
        raise UnsupportedBits(f"signround needs the auto-round library: {INSTALL}") from err


def supports(request: Request) -> None:
    auto_round_version()
    bits = request.bits
    if bits.w not in SIGNROUND_WEIGHT_BITS:
        raise UnsupportedBits(
            f"signround does not support {bits}: weight bits must be one of "
            f"{', '.join(str(b) for b in SIGNROUND_WEIGHT_BITS)}"
        )


def _quantized_weight(linear: nn.Module, bits: int, sym: bool, group: int) -> QuantizedWeight:
    """Codes from auto-round's QDQ weight and its per-group scale/zp (for accounting and packing)."""
    weight = linear.weight.detach().float()
    rows, cols = weight.shape
    scale = linear.scale.detach().float().reshape(rows, -1)
    zero = torch.zeros_like(scale) if linear.zp is None else linear.zp.detach().float().reshape(rows, -1)
    pad = (-cols) % group
    grouped = nn.functional.pad(weight, (0, pad)).reshape(rows, -1, group)
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if sym else (0, 2**bits - 1)
    codes = torch.clamp(torch.round(grouped / scale.unsqueeze(-1) + zero.unsqueeze(-1)), lo, hi)
    codes = codes.reshape(rows, -1)[:, :cols]
    return QuantizedWeight(codes.to(torch.int8 if sym else torch.uint8), scale, zero, bits, sym, group)


def tune(model: nn.Module, cfg: SignRoundConfig, bits: BitSpec, windows: list[torch.Tensor], tokenizer, seed: int):
    """Run auto-round's SignRound tuning on `windows`; returns the model auto-round gives back (its linears
    hold the fake-quantized weights and `scale` / `zp`)."""
    from auto_round import AutoRound

    tuning = {}
    if cfg.iters > 0:  # auto-round rejects SignRound's learning rates in its RTN mode (iters = 0)
        lr = cfg.lr if cfg.lr is not None else 1.0 / cfg.iters
        tuning = {"lr": lr, "minmax_lr": cfg.minmax_lr if cfg.minmax_lr is not None else lr}
    logging.getLogger("quantbench").info(
        "signround: auto-round %s, %d iters, %d windows of %d tokens",
        auto_round_version(),
        cfg.iters,
        len(windows),
        windows[0].shape[1],
    )
    tuner = AutoRound(
        model,
        tokenizer=tokenizer,
        bits=int(bits.w),
        group_size=bits.group or -1,
        sym=cfg.w_sym,
        iters=cfg.iters,
        **tuning,
        nsamples=len(windows),
        seqlen=windows[0].shape[1],
        batch_size=min(cfg.batch_size, len(windows)),
        dataset=[{"input_ids": w, "attention_mask": torch.ones_like(w)} for w in windows],
        disable_opt_rtn=cfg.disable_opt_rtn,
        amp=cfg.amp,
        enable_torch_compile=cfg.enable_torch_compile,
        seed=seed,
        device_map=str(next(model.parameters()).device),
    )
    tuned, _ = tuner.quantize()
    return tuned


def wrap_tuned(model: nn.Module, cfg: SignRoundConfig, bits: BitSpec) -> nn.Module:
    """Replace auto-round's tuned linears by our `QLinear` with the same weights (and codes for accounting)."""
    group = bits.group or -1
    left = [
        (name, tuple(linear.weight.shape))
        for name, _, _, linear in decoder_linears(model)
        if not hasattr(linear, "scale")
    ]
    if left:  # auto-round keeps integer weight-only linears with a dimension not a multiple of 32 at 16 bit
        name, shape = left[0]
        raise ValueError(
            f"auto-round left {len(left)} decoder linear(s) at 16 bit, e.g. {name} {shape[0]}x{shape[1]}: it skips "
            "linears whose dimensions are not multiples of 32; signround cannot run this model at these bits"
        )
    for _, parent, attr, linear in decoder_linears(model):
        effective_group = group if group > 0 else linear.weight.shape[1]
        qweight = _quantized_weight(linear, int(bits.w), cfg.w_sym, effective_group)
        setattr(parent, attr, QLinear(linear.weight.data, linear.bias, qweight=qweight))
    return model


def quantize(model: nn.Module, cfg: SignRoundConfig, bits: BitSpec, ctx: QuantContext) -> QuantSummary:
    summary = QuantSummary(notes={"auto_round_version": auto_round_version()})
    if bits.quantizes_weights:
        wrap_tuned(tune(model, cfg, bits, ctx.calibration(), ctx.tokenizer, ctx.seed), cfg, bits)
    return summary
