"""Fine-tuning that keeps the best held-out state (QuIP#'s recipe, Tseng et al. 2024 §5; code
`lib/algo/finetune.py`): train with the shared trainer, evaluate a held-out loss before training and after every
epoch, and end in the state with the lowest one (the code's `best_sd`; with it, the code's early stop after 3
worse epochs only saves time, so it is not copied). Used for the per-block stage (MSE to the FP block's outputs)
and the end-to-end stage (KL to the FP model) alike.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from methods.core.calibrate import BlockInputs
from methods.core.trainer import ParamGroup, TrainResult, TrainSettings, group_parameters, train


@dataclass
class BestOfEpochs:
    result: TrainResult
    first: float  # held-out loss before training
    best: float  # held-out loss of the kept state
    best_epoch: int  # 0 = the start was never beaten (training undone)


def train_keep_best(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, torch.Tensor], torch.Tensor],
    windows: torch.Tensor,
    settings: TrainSettings,
    held_out: Callable[[], float],
    steps_per_epoch: int,
    log_step: Callable[[int, dict[str, float]], None] | None = None,
    checkpoint_path=None,
) -> BestOfEpochs:
    """`train` over `settings.steps` steps, then restore the trainable parameters of the best epoch end (or of the
    start). Every parameter is left with requires_grad=False."""
    group_parameters(model, settings.groups)  # marks the trainable parameters (train() does it again)
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}

    def snapshot() -> dict[str, torch.Tensor]:
        return {name: p.detach().clone() for name, p in trainable.items()}

    def evaluate() -> float:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            value = held_out()
        model.train(was_training)
        return value

    first = evaluate()
    best = {"loss": first, "epoch": 0, "state": snapshot()}

    def on_step(step: int, metrics: dict[str, float]) -> None:
        if log_step is not None:
            log_step(step, metrics)
        if (step + 1) % steps_per_epoch == 0:
            value = evaluate()
            if value < best["loss"]:
                best.update(loss=value, epoch=(step + 1) // steps_per_epoch, state=snapshot())

    try:
        result = train(model, loss_fn, windows, settings, checkpoint_path=checkpoint_path, on_step=on_step)
        with torch.no_grad():
            for name, value in best["state"].items():
                trainable[name].copy_(value)
    finally:
        for param in model.parameters():
            param.requires_grad_(False)
    return BestOfEpochs(result, first, best["loss"], best["epoch"])


def tune_block_outputs(
    block: nn.Module,
    inputs: BlockInputs,
    targets: list[torch.Tensor],
    groups: tuple[ParamGroup, ...],
    epochs: int,
    seed: int = 0,
) -> BestOfEpochs:
    """Tune `block`'s parameters matched by `groups` so block(inputs) ≈ targets (mean squared error), one captured
    calibration batch per step; the last captured batch is held out."""
    batches = len(inputs.hidden)
    if batches < 2:
        raise ValueError(
            f"per-block fine-tuning holds out one of the captured calibration batches and got {batches}: "
            "raise calib.nsamples or lower method.calib_batch_size"
        )

    def output(i: int) -> torch.Tensor:
        out = block(inputs.hidden[i], **inputs.kwargs[i])
        return out[0] if isinstance(out, tuple) else out

    def loss(module: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        i = int(batch[0, 0])
        return F.mse_loss(output(i), targets[i])

    train_batches = batches - 1
    hidden = inputs.hidden[0]
    # The trainer draws rows of a [windows, tokens] tensor; here a row names a captured batch (its value), sized
    # so the trainer's token count is the batch's.
    rows = torch.arange(train_batches)[:, None].expand(-1, hidden.shape[0] * hidden.shape[1])
    settings = TrainSettings(steps=epochs * train_batches, batch_size=1, groups=groups, schedule="constant", seed=seed)
    return train_keep_best(
        block,
        loss,
        rows,
        settings,
        held_out=lambda: float(F.mse_loss(output(batches - 1), targets[batches - 1])),
        steps_per_epoch=train_batches,
    )
