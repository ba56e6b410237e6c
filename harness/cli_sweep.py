"""`run` and `sweep`: Hydra (multirun) over conf/, with every combination validated before any model loads.

The jobs run in `harness.hydra_app` under whatever launcher `hydra/launcher=` picks (the basic one by default,
joblib for local parallelism, submitit for SLURM); the summary and the exit status come from what the runs
recorded in the tracking store, not from this process's memory, so they are right under every launcher.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException

import harness.configs  # noqa: F401  (registers the structured configs)
from harness import spool
from harness.runner import check_supported, spec_from_config
from harness.spec import RunSpec, SpecError, run_name
from harness.tracking import StoreUnreachable, Tracker, is_unreachable
from methods.base import MissingLibrary

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
GROUPS = ("model", "method", "act", "kv", "eval", "budget")
STATUSES = ("finished", "done-before", "unsupported", "failed", "missing", "diverged")
USAGE = """usage: python -m harness run   [key=value ...]   one configuration
       python -m harness sweep [key=value ...]   comma lists expand to the cross product (Hydra multirun)

groups (key=option):  {groups}
other keys:           bits=w{{W}}[g{{G}}]a{{A}}kv{{K}}  seed=0  force=false  data_dir=...  tracking_uri=...
                      calib.nsamples=16  calib.seqlen=2048  eval.ppl.dtype=float32  method.<param>=...
                      act.<param>=...  kv.<param>=...  hydra/launcher=joblib (parallel jobs)
examples:             python -m harness run method=gptq kv=rtn bits=w4g128a16kv4 budget=smoke
                      python -m harness sweep method=rtn,gptq bits=w16a16kv16,w4g128a16kv16 model=gemma3-270m
`python -m harness list` prints methods, plug-ins, models, budgets and the bits grammar."""


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _is_hydra_override(override: str) -> bool:
    return override.lstrip("+~").startswith(("hydra.", "hydra/"))


def usage() -> str:
    groups = "  ".join(f"{group}: {'|'.join(group_options(group))}" for group in GROUPS)
    return USAGE.format(groups=groups)


def expand(overrides: list[str]) -> list[list[str]]:
    """Cross product of comma lists, exactly as Hydra's basic sweeper expands them (hydra.* overrides, which
    choose how jobs run, not what they compute, are left to Hydra)."""
    try:
        parsed = OverridesParser.create().parse_overrides([o for o in overrides if not _is_hydra_override(o)])
    except HydraException as err:
        raise SpecError(_override_error(err)) from err
    unknown = []
    for override in parsed:
        key = override.get_key_element()
        if key in GROUPS:
            valid = group_options(key)
            for value in override.sweep_string_iterator() if override.is_sweep_override() else [override.value()]:
                if str(value) not in valid:
                    unknown.append(f"unknown {key} {value!r}; valid: {', '.join(valid)}")
    if unknown:
        raise SpecError(unknown[0] if len(unknown) == 1 else "; ".join(unknown))
    return BasicSweeper.split_arguments(parsed, None)[0]


def _override_error(err: HydraException) -> str:
    """Hydra's first line plus its cause's (the wrong type, or the key that does not exist), on one line."""
    message = str(err).splitlines()[0]
    cause = str(err.__cause__).splitlines()[0] if err.__cause__ else ""
    if cause:
        message = f"{message.rstrip('.')}: {cause}"
    if "not in" in cause or not cause:
        message += " (a key that does not exist; `python -m harness list` shows each group's keys)"
    return message


def plan_specs(overrides: list[str], need_library: bool = True) -> tuple[list[tuple[RunSpec, str]], list[str]]:
    """Validate every combination: ([(spec, tracking uri + experiment)] to run, ['name: reason'] unsupported).

    Raises SpecError on a malformed combination, so nothing runs when any of them is wrong; MissingLibrary when a
    peer method's library is absent, unless `need_library` is False (composing a run key needs no library).
    """
    runnable, unsupported, malformed = [], [], {}
    combos = expand(overrides)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for combo in combos:
            try:
                try:
                    cfg = compose(config_name="config", overrides=combo)
                except HydraException as err:
                    raise SpecError(_override_error(err)) from err
                spec = spec_from_config(cfg)
            except SpecError as err:
                malformed.setdefault(str(err), []).append(combo)
                continue
            try:
                check_supported(spec, need_library)
                runnable.append((spec, (cfg.tracking_uri, cfg.experiment)))
            except ValueError as err:
                unsupported.append(f"{run_name(spec)}: {err}")
    if malformed:
        raise SpecError(_malformed_message(malformed, len(combos)))
    return runnable, unsupported


def _malformed_message(malformed: dict[str, list[list[str]]], total: int) -> str:
    """One line when there is one distinct error (as it is when every combination shares it), else every
    distinct error on its own line with the first combination it occurs in."""
    count = sum(len(combos) for combos in malformed.values())
    if len(malformed) == 1:
        message, combos = next(iter(malformed.items()))
        return message if count == total else f"{message} (in {count} of {total} combinations: {' '.join(combos[0])})"
    lines = [f"{count} of {total} combinations are malformed (nothing was run):"]
    for message, combos in malformed.items():
        where = " ".join(combos[0]) + (f" and {len(combos) - 1} more" if len(combos) > 1 else "")
        lines.append(f"  {message}  [{where}]")
    return "\n".join(lines)


def plan(overrides: list[str]) -> tuple[list[str], list[str]]:
    """(runnable run names, unsupported 'name: reason' lines); raises SpecError on a malformed combination."""
    runnable, unsupported = plan_specs(overrides)
    return [run_name(spec) for spec, _ in runnable], unsupported


def recorded_outcomes(
    runnable: list[tuple[RunSpec, tuple[str, str]]], since_ms: int
) -> dict[str, tuple[str, str, str]]:
    """Run key -> (run name, outcome, the failed run's `error` tag or ""), read from the tracking store (keyed by
    run key: two runs may share a name, e.g. when they differ only in an evaluation setting): `finished` /
    `failed` if a run of the key started after `since_ms` ended so, `done-before` if only an earlier FINISHED run
    exists, else `missing` (the job died before recording anything)."""
    outcomes, trackers = {}, {}
    for spec, (uri, experiment) in runnable:
        tracker = trackers.setdefault((uri, experiment), Tracker(uri, experiment))
        runs = tracker.runs_with_key(spec.run_key)
        new = sorted((r for r in runs if r.info.start_time >= since_ms), key=lambda r: r.info.start_time)
        error = ""
        if new:
            outcome = {"FINISHED": "finished", "RUNNING": "missing"}.get(new[-1].info.status, "failed")
            if outcome == "finished" and new[-1].data.tags.get("outcome") == "DIVERGED":
                outcome = "diverged"
            if outcome == "failed":
                error = new[-1].data.tags.get("error", "")
        elif any(r.info.status == "FINISHED" for r in runs):
            outcome = "done-before"
        else:
            outcome = "missing"
        outcomes[spec.run_key] = (run_name(spec), outcome, error)
    return outcomes


def main(overrides: list[str], multirun: bool) -> int:
    if any(o in ("-h", "--help") for o in overrides):
        print(usage())
        return 0
    try:
        runnable, unsupported = plan_specs(overrides)
    except (SpecError, MissingLibrary) as err:
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
    for uri, experiment in {store for _, store in runnable}:
        try:
            tracker = Tracker(uri, experiment)  # create (migrate) the store once, before parallel jobs race to
        except StoreUnreachable as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        for line in spool.sync(tracker):  # results spooled while the store was down, uploaded first
            print(f"[quantbench] uploaded spooled run {line}", flush=True)
    since_ms = int(time.time() * 1000) - 1000
    app = [sys.executable, "-m", "harness.hydra_app", *(["--multirun"] if multirun else []), *overrides]
    returncode = subprocess.call(app)
    try:
        outcomes = recorded_outcomes(runnable, since_ms)
    except Exception as err:
        if not is_unreachable(err):
            raise
        print(
            f"error: tracking store unreachable after the jobs ran ({type(err).__name__}); their results are in "
            f"{spool.spool_dir()} or the store: `python -m harness sync` once it is back",
            file=sys.stderr,
        )
        return 1
    counts = dict.fromkeys(STATUSES, 0) | {"unsupported": len(unsupported)}
    for _, outcome, _ in outcomes.values():
        counts[outcome] += 1
    print("[quantbench] summary: " + ", ".join(f"{v} {k}" for k, v in counts.items()), flush=True)
    for key, (name, outcome, error) in outcomes.items():
        if outcome == "failed":  # a launcher (submitit, ray) keeps the job's own log elsewhere: say why here
            print(f"[quantbench] failed   {name} (run key {key}): {error or 'no error recorded'}")
        if outcome == "missing":
            print(f"[quantbench] missing  {name} (run key {key}): no run recorded (the job died; see the log above)")
    return 1 if counts["failed"] or counts["missing"] or returncode else 0
