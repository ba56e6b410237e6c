"""Test helper: quantize a model the way the runner does — the weight method, then the act/KV plug-ins the bit
setting uses (RTN plug-ins by default, with the given settings)."""

from __future__ import annotations

from harness.runner import apply
from harness.spec import BitSpec
from methods import METHODS
from methods.act import rtn as act_rtn
from methods.base import QuantContext, QuantSummary
from methods.kv import rtn as kv_rtn


def no_data():
    raise AssertionError("this method must not read calibration data")


def quantize(
    model, method: str, config, bits: str, calibration=no_data, seed: int = 0, act_config=None, kv_config=None
) -> QuantSummary:
    spec = BitSpec.parse(bits)
    act = act_rtn.build(act_config or act_rtn.RTNActConfig(), spec.a) if spec.quantizes_activations else None
    kv = kv_rtn.build(kv_config or kv_rtn.RTNKVConfig(), spec.kv) if spec.quantizes_kv else None
    ctx = QuantContext(seed=seed, calibration=calibration, act=act, kv=kv)
    return apply(model, METHODS[method], config, spec, ctx)


SMOKE = ["model=tiny-llama", "budget=smoke", "eval.ppl.seqlen=256"]  # a tiny run of seconds


def compose_run(overrides: list[str]):
    """(RunSpec, config) composed from conf/ with `overrides`, as `python -m harness run` composes them."""
    from hydra import compose, initialize_config_dir

    from harness.cli_sweep import CONF_DIR
    from harness.runner import spec_from_config

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    return spec_from_config(cfg), cfg
