"""`run` and `sweep`: Hydra (multirun) over conf/, with every combination validated before any model loads."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig

from harness.runner import Outcome, execute, run_name, spec_from_config
from harness.spec import SpecError
from harness.tracking import Tracker
from methods import METHODS

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
GROUPS = ("model", "method", "eval", "budget")
_OUTCOMES: list[Outcome] = []


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def expand(overrides: list[str]) -> list[list[str]]:
    """Cross product of comma lists, exactly as Hydra's basic sweeper expands them."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    for override in parsed:
        key = override.get_key_element()
        if key in GROUPS:
            valid = group_options(key)
            for value in override.sweep_string_iterator() if override.is_sweep_override() else [override.value()]:
                if str(value) not in valid:
                    raise SpecError(f"unknown {key} {value!r}; valid: {', '.join(valid)}")
    return BasicSweeper.split_arguments(parsed, None)[0]


def plan(overrides: list[str]) -> tuple[list[str], list[str]]:
    """Validate every combination; return (runnable run names, unsupported 'name: reason' lines).

    Raises SpecError on a malformed combination, so nothing runs when any of them is wrong.
    """
    runnable, unsupported = [], []
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for combo in expand(overrides):
            try:
                cfg = compose(config_name="config", overrides=combo)
            except HydraException as err:
                first = str(err).splitlines()[0]
                raise SpecError(f"{first} (a key that does not exist; see conf/ or `python -m harness list`)") from err
            spec = spec_from_config(cfg)
            try:
                METHODS[spec.method].supports(spec.bits)
                runnable.append(run_name(spec))
            except ValueError as err:
                unsupported.append(f"{run_name(spec)}: {err}")
    return runnable, unsupported


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def _job(cfg: DictConfig) -> None:
    spec = spec_from_config(cfg)
    outcome = execute(spec, cfg, Tracker(cfg.tracking_uri, cfg.experiment), force=bool(cfg.force))
    _OUTCOMES.append(outcome)
    print(f"[quantbench] {outcome.status:>11}  {outcome.run_name}  {outcome.detail}", flush=True)


def main(overrides: list[str], multirun: bool) -> int:
    try:
        runnable, unsupported = plan(overrides)
    except SpecError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not multirun and len(runnable) + len(unsupported) > 1:
        print("error: comma lists need `sweep`, not `run`", file=sys.stderr)
        return 2
    if unsupported and not multirun:
        print(f"error: {unsupported[0]}", file=sys.stderr)
        return 2
    for line in unsupported:
        print(f"[quantbench] skipping unsupported {line}", flush=True)
    print(f"[quantbench] {len(runnable)} run(s) to do, {len(unsupported)} unsupported skipped", flush=True)
    _OUTCOMES.clear()
    argv = sys.argv
    sys.argv = [argv[0], *(["--multirun"] if multirun else []), *overrides]
    try:
        _job()
    finally:
        sys.argv = argv
    failed = [o for o in _OUTCOMES if o.status == "failed"]
    counts = {s: sum(o.status == s for o in _OUTCOMES) for s in ("finished", "done-before", "unsupported", "failed")}
    print("[quantbench] summary: " + ", ".join(f"{v} {k}" for k, v in counts.items()), flush=True)
    return 1 if failed else 0
