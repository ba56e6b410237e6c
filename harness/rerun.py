"""Re-run recorded runs under today's code: `python -m harness rerun`.

A record in `reports/runs.jsonl` keeps what its run key hashed (model, method and its parameters, act/KV
plug-ins, bits, seed, calibration and evaluation protocol), so the `harness run` overrides that reproduce the
key can be rebuilt from it. Each rebuilt command is composed and its run key checked against the record's before
anything runs: a re-run replaces its record (same key, `force=true`) instead of adding a near-duplicate row.
Use it to add what later code measures (KL / top-1 vs FP, per-window NLL) to older rows, or to re-measure a row
after a fix. Parameters added to a method after a run was recorded are set to the value the run implicitly had
(`methods.core.params.legacy_values`), which leaves them out of the key as they were. A record that names its fp32
CPU matmul library (`cpu_gemm`) re-runs on it; older records re-run on today's default.
"""

from __future__ import annotations

import argparse
import ast
import shlex
import sys
from pathlib import Path

from harness.records import PROTOCOL_PARAMS, read_records
from harness.spec import SpecError

RECORDS = Path(__file__).resolve().parents[1] / "reports" / "runs.jsonl"
# act/KV parameters recorded as method parameters before the plug-ins existed (harness.spec._LEGACY_ACT/_KV)
LEGACY_PLUGIN_PARAMS = {
    "a_sym": "act.sym",
    "a_clip_ratio": "act.clip_ratio",
    "kv_sym": "kv.sym",
    "kv_clip_ratio": "kv.clip_ratio",
    "kv_group_size": "kv.group_size",
}
FIDELITY_METRICS = ("kl_vs_fp", "top1_vs_fp")  # 0 and 1 by definition for the unquantized setting
UNQUANTIZED = "w16a16kv16"


def _value(text: str) -> str:
    """A logged parameter as a Hydra override value."""
    if any(c in text for c in " ,'\"[]{}"):
        raise SpecError(f"a recorded parameter value {text!r} cannot be rebuilt as an override")
    return text


def _tasks(text: str) -> str:
    return "[" + ",".join(ast.literal_eval(text)) + "]"


def overrides_for(record: dict) -> list[str]:
    """The `harness run` overrides that rebuild this record's run key (without `force=true`)."""
    from methods import METHODS
    from methods.core.params import legacy_values

    protocol, method_params = record["protocol"], record["method_params"]
    if record["method"] not in METHODS:
        raise SpecError(f"run {record['run_key']}: method {record['method']!r} is no longer registered")
    overrides = [f"model={record['model']}", f"method={record['method']}", f"bits={record['bits']}"]
    overrides.append(f"budget={protocol['budget']}")
    for name, key in PROTOCOL_PARAMS.items():
        value = protocol.get(name)
        if name == "budget" or value is None:
            continue
        if name == "zs_tasks":
            if value != "[]":
                overrides.append(f"{key}={_tasks(value)}")
            continue
        if name in ("zs_limit", "zs_sample", "zs_sample_seed") and protocol.get("zs_tasks") in (None, "[]"):
            continue
        overrides.append(f"{key}={_value(value)}")
    if record.get("cpu_gemm"):  # not in the key, but it moves rounding-sensitive methods (harness.records)
        overrides.append(f"cpu_gemm={_value(record['cpu_gemm'])}")
    for name, value in method_params.items():
        overrides.append(f"{LEGACY_PLUGIN_PARAMS.get(name, 'method.' + name)}={_value(value)}")
    for name, value in legacy_values(METHODS[record["method"]].config_cls).items():
        if name not in method_params:
            overrides.append(f"method.{name}={'null' if value is None else value}")
    for group in ("act", "kv"):
        params = record.get(group) or {}
        if params.get("name"):
            overrides.append(f"{group}={params['name']}")
            taken = {o.split("=", 1)[0] for o in overrides}
            overrides += [
                f"{group}.{k}={_value(v)}" for k, v in params.items() if k != "name" and f"{group}.{k}" not in taken
            ]
    return overrides


def unrecorded_params(record: dict) -> list[str]:
    """The method's parameters this record lacks that carry no legacy value: they enter today's key."""
    import dataclasses

    from methods import METHODS
    from methods.core.params import legacy_values

    config_cls = METHODS[record["method"]].config_cls
    recorded = {name.split(".", 1)[0] for name in record["method_params"]}
    legacy = legacy_values(config_cls)
    return [f.name for f in dataclasses.fields(config_cls) if f.name not in recorded and f.name not in legacy]


def checked_overrides(record: dict, need_library: bool = True) -> list[str]:
    """`overrides_for(record)` once composing them gives the record's run key; else SpecError naming the key.
    MissingLibrary when the record's peer method lacks its library here, unless `need_library` is False."""
    from harness.cli_sweep import plan_specs

    overrides = overrides_for(record)
    unmarked = unrecorded_params(record)
    if unmarked:
        raise SpecError(
            f"run {record['run_key']}: method {record['method']} gained {', '.join(unmarked)} after this run without "
            "marking them added_later (methods.core.params), so today's key for its settings differs; run it anew"
        )
    runnable, unsupported = plan_specs(overrides, need_library)
    if unsupported:
        raise SpecError(f"run {record['run_key']}: no longer supported ({unsupported[0]})")
    key = runnable[0][0].run_key
    if key != record["run_key"]:
        raise SpecError(
            f"run {record['run_key']}: its rebuilt overrides give run key {key} (it set a value the record does not "
            "keep, e.g. train.*); re-run it with its original command and force=true"
        )
    return overrides


def select(records: list[dict], keys: list[str], missing: str | None, filters: dict[str, str]) -> list[dict]:
    """Records named by run key (a unique prefix will do), or every finished record lacking metric `missing`."""
    chosen = []
    for key in keys:
        found = [r for r in records if r["run_key"].startswith(key)]
        if not found:
            raise SpecError(f"no record has run key {key!r}; the keys are in reports/runs.jsonl (field run_key)")
        if len(found) > 1:
            raise SpecError(f"run key {key!r} matches {len(found)} records; give a longer prefix")
        chosen += found
    if missing:
        chosen += [
            r
            for r in records
            if r["status"] == "FINISHED"
            and missing not in r["metrics"]
            and not (missing in FIDELITY_METRICS and r["bits"] == UNQUANTIZED)
        ]
    return [r for r in chosen if all(r.get(field) == value for field, value in filters.items() if value)]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m harness rerun",
        description="Re-run recorded runs (same run key, force=true) under today's code.",
    )
    parser.add_argument("keys", nargs="*", help="run keys (or unique prefixes) from reports/runs.jsonl")
    parser.add_argument("--missing", help="every finished record without this metric, e.g. kl_vs_fp")
    parser.add_argument("--model")
    parser.add_argument("--method")
    parser.add_argument("--bits")
    parser.add_argument("--print", action="store_true", help="print the commands, run nothing")
    parser.add_argument("--records", type=Path, default=RECORDS)
    args = parser.parse_args(argv)
    if not args.keys and not args.missing:
        print("error: name run keys or --missing METRIC (e.g. --missing kl_vs_fp)", file=sys.stderr)
        return 2
    try:
        records = select(
            read_records(args.records),
            args.keys,
            args.missing,
            {"model": args.model, "method": args.method, "bits": args.bits},
        )
        commands = [(r, checked_overrides(r) + ["force=true"]) for r in records]
    except SpecError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for record, overrides in commands:
        print(f"# {record['run_key']}  {record['model']} · {record['method']} · {record['bits']}")
        print("python -m harness run " + shlex.join(overrides), flush=True)
    if args.print:
        return 0
    from harness import cli_sweep

    failed = sum(cli_sweep.main(overrides, multirun=False) != 0 for _, overrides in commands)
    print(f"[quantbench] rerun: {len(commands) - failed} of {len(commands)} re-ran")
    return 1 if failed else 0
