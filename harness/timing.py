"""Timing helpers the benches share (harness/bench.py, harness/bench_gemm.py): a run composed as `harness run`
composes it, forward and frozen-weight gradient-step timers, and the markdown row they print."""

from __future__ import annotations

import statistics
import time

import torch


def timing_row(name: str, times: list[float]) -> str:
    """A markdown table row: `name`, then min / median / max of `times` in seconds."""
    return f"| {name} | {min(times):.3f} | {statistics.median(times):.3f} | {max(times):.3f} |"


def time_forward(model, ids, reps: int) -> list[float]:
    times = []
    with torch.inference_mode():
        for _ in range(reps):
            start = time.perf_counter()
            model(ids, use_cache=False)
            times.append(time.perf_counter() - start)
    return times


def time_input_gradient_step(model, ids, reps: int) -> list[float]:
    """Forward + backward of the language-model loss to the input embeddings with every weight frozen: the cost
    shape of a step that learns only transforms of the activations (SpinQuant's rotations)."""
    model.requires_grad_(False)
    times = []
    for _ in range(reps):
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
        start = time.perf_counter()
        model(inputs_embeds=embeds, labels=ids, use_cache=False).loss.backward()
        times.append(time.perf_counter() - start)
    return times


def timing_overrides(method: str) -> list[str]:
    """A forward's cost does not depend on the weight values: rotation methods get RTN weights (no calibration)
    and SpinQuant its starting rotation (no learning steps) when only their forward is timed."""
    rotation_only = {"quarot": ["method.weights=rtn"], "spinquant": ["method.weights=rtn", "method.loop.steps=0"]}
    return rotation_only.get(method, [])


def compose_run(model_name: str, method: str, bits: str, overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from harness.cli_sweep import CONF_DIR
    from harness.runner import check_supported, spec_from_config

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"model={model_name}", f"method={method}", f"bits={bits}", *overrides])
    run = spec_from_config(cfg)
    check_supported(run)
    return run
