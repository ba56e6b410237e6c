"""The shared training loop for quantization-aware methods (BitDistiller, ParetoQ, RCP) and learned rotations
(SpinQuant): parameter groups by name with their own learning rate, weight decay and optimizer; warmup +
constant/cosine/linear schedules; gradient accumulation; optional bf16 autocast over fp32 master weights; a
seeded, position-addressed data order; atomic checkpoints from which a killed run resumes to the same result.

Parameters matched by no group are frozen. A group's `optimizer` names a factory in `OPTIMIZERS` or in the
`optimizers` mapping a method passes to `train` (e.g. SpinQuant's Cayley SGD on its rotations); a factory takes
torch param-group dicts and returns an optimizer.

Data order: micro-batch k (counted over the whole run) takes `batch_size` windows from a permutation of the
training windows drawn for its epoch from `seed + epoch`, so the batch at any step is a function of (seed, step)
alone — what makes resuming exact without saving a data loader.
"""

from __future__ import annotations

import math
import pickle
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from methods.core.atomic import atomic_write
from methods.core.params import flag, valid

OptimizerFactory = Callable[[list[dict]], torch.optim.Optimizer]
OPTIMIZERS: dict[str, OptimizerFactory] = {
    "adamw": lambda groups: torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8, foreach=True),
    "sgd": lambda groups: torch.optim.SGD(groups, momentum=0.0),
}
SCHEDULES = ("constant", "cosine", "linear")


@dataclass(frozen=True)
class ParamGroup:
    pattern: str  # regular expression searched in the parameter's qualified name
    lr: float
    weight_decay: float = 0.0
    optimizer: str = "adamw"


@dataclass(frozen=True)
class TrainSettings:
    steps: int
    batch_size: int = 1
    grad_accum: int = 1
    groups: tuple[ParamGroup, ...] = (ParamGroup(r".*", 2e-5),)
    schedule: str = "cosine"
    warmup_steps: int = 0
    max_grad_norm: float | None = None
    bf16_autocast: bool = False
    seed: int = 0
    checkpoint_every: int = 0  # steps between checkpoints; 0 = none


@dataclass
class TrainResult:
    steps: int
    tokens: int
    seconds: float
    losses: list[float] = field(default_factory=list)  # per optimizer step (mean over its micro-batches)
    resumed_from: int = 0

    def metrics(self) -> dict[str, float]:
        """What the run records of its training (the leaderboard's cost column reads tokens and seconds)."""
        losses = {"train_loss_first": self.losses[0], "train_loss_last": self.losses[-1]} if self.losses else {}
        return {
            "train_steps": float(self.steps),
            "train_tokens": float(self.tokens),
            "train_seconds": self.seconds,
            **losses,
        }


@dataclass(frozen=True)
class LoopConfig:
    """A training method's loop settings as its config exposes them (`method.loop.*`); each method gives its
    paper's defaults with `field(default_factory=lambda: LoopConfig(...))`."""

    steps: int | None = valid(None, ge=0, none=True)  # optimizer steps; None = one pass over the training windows
    batch_size: int = valid(2, ge=1)
    grad_accum: int = valid(1, ge=1)
    lr: float = valid(2e-5, gt=0)
    weight_decay: float = valid(0.0, ge=0)
    schedule: str = valid("cosine", choices=SCHEDULES)
    warmup_steps: int = valid(0, ge=0)
    max_grad_norm: float | None = valid(None, gt=0, none=True)
    loss_chunk: int = valid(256, ge=1)  # positions per lm_head chunk in the loss
    checkpoint_every: int = valid(50, ge=0)
    bf16_autocast: bool = flag(False)  # bf16 compute, fp32 master weights (CUDA; this CPU has no bf16 units)

    def one_pass(self, windows: int) -> int:
        return max(1, windows // (self.batch_size * self.grad_accum))

    def settings(self, steps: int, pattern: str, seed: int, extra_groups: tuple[ParamGroup, ...] = ()) -> TrainSettings:
        """Train the parameters whose names match `pattern` with this loop for `steps` steps (and any `extra_groups`
        with their own lr, e.g. a learnable quantizer's parameters)."""
        return TrainSettings(
            steps=steps,
            batch_size=self.batch_size,
            grad_accum=self.grad_accum,
            groups=(ParamGroup(pattern, self.lr, self.weight_decay), *extra_groups),
            schedule=self.schedule,
            warmup_steps=self.warmup_steps,
            max_grad_norm=self.max_grad_norm,
            seed=seed,
            checkpoint_every=self.checkpoint_every,
            bf16_autocast=self.bf16_autocast,
        )


def lr_factor(step: int, settings: TrainSettings) -> float:
    """Multiplier of each group's lr at optimizer step `step` (0-based): linear warmup, then the schedule."""
    if step < settings.warmup_steps:
        return (step + 1) / settings.warmup_steps
    if settings.schedule == "constant":
        return 1.0
    progress = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
    if settings.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - progress


def group_parameters(model: nn.Module, groups: tuple[ParamGroup, ...]) -> dict[str, list[dict]]:
    """optimizer name -> torch param groups; every parameter matched by no group gets requires_grad=False."""
    buckets: dict[int, list[nn.Parameter]] = {i: [] for i in range(len(groups))}
    for name, param in model.named_parameters():
        index = next((i for i, g in enumerate(groups) if re.search(g.pattern, name)), None)
        param.requires_grad_(index is not None)
        if index is not None:
            buckets[index].append(param)
    by_optimizer: dict[str, list[dict]] = {}
    for index, group in enumerate(groups):
        if buckets[index]:
            entry = {"params": buckets[index], "lr": group.lr, "weight_decay": group.weight_decay}
            by_optimizer.setdefault(group.optimizer, []).append(entry)
    if not by_optimizer:
        raise ValueError(f"no parameter matches the training groups {[g.pattern for g in groups]}")
    return by_optimizer


def batch_at(windows: torch.Tensor, micro_index: int, batch_size: int, seed: int) -> torch.Tensor:
    """The `micro_index`-th micro-batch of the seeded, epoch-wise shuffled order over `windows` [N, tokens]."""
    n = windows.shape[0]
    rows = []
    for k in range(micro_index * batch_size, (micro_index + 1) * batch_size):
        epoch, position = divmod(k, n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
        rows.append(int(order[position]))
    return windows[rows]


def load_checkpoint(path: Path) -> dict:
    """A checkpoint written by `train`: tensors and plain values only (`weights_only=True`), so a file planted in
    the cache cannot run code when a run resumes; anything else is refused with one line."""
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"checkpoint {path} holds more than tensors and plain values ({first}); delete it to train from the start"
        ) from None


def _save_atomic(state: dict, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))  # a kill mid-write leaves the previous checkpoint


def train(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, torch.Tensor], torch.Tensor],
    windows: torch.Tensor,
    settings: TrainSettings,
    checkpoint_path: str | Path | None = None,
    optimizers: Mapping[str, OptimizerFactory] | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train `model` in place on `windows` ([N, tokens] token ids) to minimise `loss_fn(model, batch)`.

    `on_step(step, metrics)` receives loss, lr and tokens/s after every optimizer step (for MLflow step metrics).
    With `checkpoint_path`, a checkpoint is written every `checkpoint_every` steps and at the end, and a run
    that finds one resumes from it (trainable parameters, optimizer and schedule state, RNG, step)."""
    if settings.schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {settings.schedule!r}")
    factories = {**OPTIMIZERS, **(optimizers or {})}
    param_groups = group_parameters(model, settings.groups)
    unknown = sorted(set(param_groups) - set(factories))
    if unknown:
        raise ValueError(f"unknown optimizer(s) {', '.join(unknown)}; known: {', '.join(sorted(factories))}")
    opts = [factories[name](groups) for name, groups in sorted(param_groups.items())]
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: lr_factor(s, settings)) for o in opts]
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}

    result = TrainResult(steps=settings.steps, tokens=0, seconds=0.0)
    start_step, path = 0, Path(checkpoint_path) if checkpoint_path else None
    if path is not None and path.exists():
        state = load_checkpoint(path)
        with torch.no_grad():
            for name, value in state["params"].items():
                trainable[name].copy_(value)
        for opt, sched, opt_state, sched_state in zip(
            opts, scheds, state["optimizers"], state["schedulers"], strict=True
        ):
            opt.load_state_dict(opt_state)
            sched.load_state_dict(sched_state)
        torch.set_rng_state(state["rng"])
        start_step, result.losses, result.seconds = state["step"], state["losses"], state["seconds"]
        result.resumed_from = start_step

    def checkpoint(step: int) -> None:
        params = {name: p.detach().clone() for name, p in trainable.items()}
        _save_atomic(
            {
                "step": step,
                "params": params,
                "optimizers": [o.state_dict() for o in opts],
                "schedulers": [s.state_dict() for s in scheds],
                "rng": torch.get_rng_state(),
                "losses": result.losses,
                "seconds": result.seconds,
            },
            path,
        )

    tokens_per_step = settings.batch_size * settings.grad_accum * windows.shape[1]
    device_type = next(model.parameters()).device.type
    model.train()
    bar = tqdm(total=settings.steps, initial=start_step, desc="train", unit="step")
    for step in range(start_step, settings.steps):
        began = time.perf_counter()
        step_loss = 0.0
        for micro in range(settings.grad_accum):
            batch = batch_at(windows, step * settings.grad_accum + micro, settings.batch_size, settings.seed)
            with torch.autocast(device_type, dtype=torch.bfloat16, enabled=settings.bf16_autocast):
                loss = loss_fn(model, batch.to(next(model.parameters()).device))
            (loss / settings.grad_accum).backward()
            step_loss += float(loss.detach()) / settings.grad_accum
        if settings.max_grad_norm is not None:
            nn.utils.clip_grad_norm_(list(trainable.values()), settings.max_grad_norm)
        for opt, sched in zip(opts, scheds, strict=True):
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - began
        result.seconds += elapsed
        result.losses.append(step_loss)
        metrics = {
            "loss": step_loss,
            "lr_factor": lr_factor(step, settings),
            "tokens_per_second": tokens_per_step / elapsed,
        }
        bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{metrics['tokens_per_second']:.0f}")
        bar.update(1)
        if on_step is not None:
            on_step(step, metrics)
        done = step + 1
        if path is not None and (
            done == settings.steps or (settings.checkpoint_every and done % settings.checkpoint_every == 0)
        ):
            checkpoint(done)
    bar.close()
    model.eval()
    result.tokens = settings.steps * tokens_per_step
    return result
