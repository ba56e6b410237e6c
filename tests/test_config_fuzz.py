"""A fuzzer over every declared configuration field (issue 48): for each registered method and plug-in, and the
run-level settings, values drawn from inside and outside each field's declared rule — negative, zero, huge, wrong
type, empty list, unknown name — are planned as `harness run … model=tiny-llama budget=smoke` would. Every outcome
must be a one-line error before any model loads, or a plan; never a traceback. The slow variant draws more and
runs a sample of the accepted configurations for real, each to a FINISHED run within a time limit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness import cli_sweep
from harness.spec import CalibSpec, PerplexitySpec, SpecError, TrainSpec
from methods import METHODS
from methods.act import ACT_QUANTIZERS
from methods.core.params import Valid, leaves
from methods.kv import KV_QUANTIZERS

# a bit setting each method plans at on tiny-llama (plug-in fields are fuzzed under rtn, which uses both)
BITS = {name: "w2a16kv16" if name in ("r2q",) else "w4a16kv16" for name in METHODS}
BITS |= {"rcp": "w2a4kv4", "bcq": "w4a4kv16", "spinquant": "w4a4kv4", "quarot": "w4a4kv4"}


def _targets() -> list[tuple[list[str], str, object, Valid | None]]:
    """(base overrides, the override key, its default, its rule) for every declared field."""
    targets = []
    for name, entry in sorted(METHODS.items()):
        base = [f"method={name}", f"bits={BITS[name]}"]
        targets += [(base, f"method.{key}", default, rule) for key, default, rule in leaves(entry.config_cls())]
    for group, registry in (("act", ACT_QUANTIZERS), ("kv", KV_QUANTIZERS)):
        for name, entry in sorted(registry.items()):
            base = ["method=rtn", "bits=w16a4kv4", f"{group}={name}"]
            targets += [(base, f"{group}.{key}", default, rule) for key, default, rule in leaves(entry.config_cls())]
    run_level = (("calib", CalibSpec()), ("eval.ppl", PerplexitySpec()), ("train", TrainSpec()))
    for prefix, spec in run_level:
        method = "method=paretoq" if prefix == "train" else "method=gptq"
        numeric = [leaf for leaf in leaves(spec) if leaf[0] not in ("dataset", "max_windows")]  # not numeric settings
        targets += [([method, "bits=w4a16kv16"], f"{prefix}.{key}", default, rule) for key, default, rule in numeric]
    return targets


TARGETS = _targets()
HOSTILE = ("-1", "0", "1e12", "999999", "abc", "[]", "null", "nope", "''", "-0.5", "true")


def _text(value) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


@st.composite
def _override(draw):
    base, key, default, rule = draw(st.sampled_from(TARGETS))
    inside = [_text(default)]
    if rule is not None and rule.choices is not None:
        inside += [_text(choice) for choice in rule.choices]
    elif rule is not None and isinstance(default, int | float) and not isinstance(default, bool):
        low = rule.ge if rule.ge is not None else (rule.gt + 1e-3 if rule.gt is not None else 0)
        inside += [_text(type(default)(low)), _text(type(default)(max(low, default) * 2))]
    value = draw(st.sampled_from(inside + list(HOSTILE)))
    return base, f"{key}={value}"


def _plan(base: list[str], override: str):
    """`plan`'s outcome: ('planned', n) or ('refused', message); anything else raises out of the test. A peer
    method's missing library is not what this checks (tests/test_hqq.py, test_llmc.py do): the values are."""
    overrides = ["model=tiny-llama", "budget=smoke", "tracking_uri=sqlite:////tmp/quantbench-fuzz.db", *base, override]
    try:
        runnable, unsupported = cli_sweep.plan_specs(overrides, need_library=False)  # values, not libraries
    except SpecError as err:
        return "refused", str(err)
    return "planned", len(runnable) + len(unsupported)


def _check(base: list[str], override: str) -> tuple[str, object]:
    outcome, detail = _plan(base, override)
    if outcome == "refused":
        assert "\n" not in detail and len(detail) < 2000, (override, detail)  # one line
        assert override.split("=", 1)[0].rsplit(".", 1)[-1] in detail or "override" in detail or "value" in detail, (
            override,
            detail,
        )  # it names the field (or Hydra's own "could not override" / type message)
    else:
        assert detail == 1, (override, detail)
    return outcome, detail


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(_override())
def test_every_drawn_value_is_planned_or_refused_in_one_line(drawn):
    _check(*drawn)


def test_every_declared_field_is_in_the_fuzzers_reach():
    assert len(TARGETS) >= 150 and all(rule is not None for _, key, _, rule in TARGETS if "dataset" not in key), [
        key for _, key, _, rule in TARGETS if rule is None
    ]


@pytest.mark.slow
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(_override())
def test_more_draws_are_planned_or_refused_in_one_line(drawn):
    _check(*drawn)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(6))
def test_a_sample_of_accepted_draws_runs_to_finished_within_a_time_limit(seed, tmp_path):
    """Six seeded draws that planning accepts, run for real on tiny-llama at the smoke budget: each ends
    FINISHED (or refused by its method before loading) within 5 minutes."""
    import random

    rng = random.Random(seed)
    while True:
        base, key, default, rule = rng.choice(TARGETS)
        values = [_text(c) for c in rule.choices] if rule is not None and rule.choices is not None else [_text(default)]
        override = f"{key}={rng.choice(values)}"
        if _plan(base, override)[0] == "planned":
            break
    command = [sys.executable, "-m", "harness", "run", "model=tiny-llama", "budget=smoke",
               f"tracking_uri=sqlite:///{tmp_path}/mlflow.db", *base, override]  # fmt: skip
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=root)
    summary = done.stdout[-800:]  # the sweep's summary (progress bars go to stderr)
    assert done.returncode == 0 and ("1 finished" in summary or "1 unsupported" in summary), (override, summary)
