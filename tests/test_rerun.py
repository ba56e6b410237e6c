"""`harness rerun`: the overrides rebuilt from a record give back the record's run key, or a one-line reason."""

from __future__ import annotations

import copy
import importlib.util

import pytest

from harness import rerun
from harness.records import read_records
from harness.spec import SpecError
from methods import METHODS
from methods.base import MissingLibrary

RECORDS = read_records(rerun.RECORDS)


def _record(**match) -> dict:
    found = [r for r in RECORDS if all(r.get(k) == v for k, v in match.items())]
    assert found, f"reports/runs.jsonl has no record with {match}"
    return copy.deepcopy(found[0])


def test_every_recorded_run_rebuilds_its_run_key_or_names_the_parameters_that_moved_it():
    """The whole leaderboard: legacy act/KV method parameters, plug-ins, QAT budgets, zero-shot protocols, seeds.
    A record may fail only because its method gained keyed parameters after it ran (then the error names them,
    and they are exactly the ones the record lacks). The one such case in the history: SpinQuant's
    `loop_weights` / `loop_w_mse_clip`, added (3298d62) without a legacy value after four W4A4KV4 runs."""
    for record in RECORDS:
        unmarked = rerun.unrecorded_params(record)
        if unmarked:
            assert record["method"] == "spinquant" and unmarked == ["loop_weights", "loop_w_mse_clip"]
            with pytest.raises(SpecError, match=", ".join(unmarked)):
                rerun.checked_overrides(record)
            continue
        if _library_missing(record["method"]):
            environment = METHODS[record["method"]].environment
            with pytest.raises(MissingLibrary, match=rf"nox -s {environment}\b"):
                rerun.checked_overrides(record)
        rerun.checked_overrides(record, need_library=False)


def _library_missing(method: str) -> bool:
    required = METHODS[method].requires
    return required is not None and importlib.util.find_spec(required) is None


def test_a_changed_parameter_is_caught_before_anything_runs():
    record = _record(method="gptq", bits="w4g128a16kv16")
    record["method_params"]["damp"] = "0.02"  # the key still says 0.01
    with pytest.raises(SpecError, match=f"run {record['run_key']}: its rebuilt overrides give run key"):
        rerun.checked_overrides(record)


def test_zero_shot_and_plugin_protocols_become_overrides():
    record = _record(method="rtn", bits="w16a16kv3", run_key="12c0c5f2fa51bdcb")
    overrides = rerun.overrides_for(record)
    assert "kv=kvquant" in overrides and "kv.outlier_fraction=0.01" in overrides
    fast = next(r for r in RECORDS if r["protocol"]["zs_limit"] == "200")
    overrides = rerun.overrides_for(fast)
    assert "eval.zeroshot.tasks=[piqa,hellaswag,arc_easy,arc_challenge,winogrande,lambada_openai]" in overrides
    assert "eval.zeroshot.limit=200" in overrides


def test_a_recorded_matmul_library_is_kept_and_stays_out_of_the_key():
    record = _record(method="gptq", bits="w4g128a16kv16")
    record.pop("cpu_gemm", None)
    assert not any(o.startswith("cpu_gemm=") for o in rerun.checked_overrides(record))
    record["cpu_gemm"] = "mkl"
    overrides = rerun.checked_overrides(record)  # the same run key with the library named
    assert "cpu_gemm=mkl" in overrides


def test_missing_kl_selects_quantized_rows_only_and_prefixes_must_be_unique():
    # Every quantized row of the leaderboard has KL now: take it away from two ParetoQ rows and an FP row.
    records = copy.deepcopy(RECORDS)
    finished = [r for r in records if r["status"] == "FINISHED"]
    stripped = [r for r in finished if r["method"] == "paretoq"][:2]
    fp = next(r for r in finished if r["bits"] == rerun.UNQUANTIZED)
    for record in [*stripped, fp]:
        for name in rerun.FIDELITY_METRICS:
            record["metrics"].pop(name, None)
    chosen = rerun.select(records, [], "kl_vs_fp", {})
    assert {r["run_key"] for r in stripped} <= {r["run_key"] for r in chosen}
    assert all("kl_vs_fp" not in r["metrics"] for r in chosen)
    assert all(r["bits"] != rerun.UNQUANTIZED for r in chosen)  # FP's KL is 0 by definition, not worth a pass
    paretoq = [r for r in chosen if r["method"] == "paretoq"]
    assert rerun.select(records, [], "kl_vs_fp", {"method": "paretoq"}) == paretoq
    with pytest.raises(SpecError, match="give a longer prefix"):
        rerun.select(RECORDS, [""], None, {})
    with pytest.raises(SpecError, match="no record has run key 'zzzz'"):
        rerun.select(RECORDS, ["zzzz"], None, {})


def test_cli_prints_the_commands_and_refuses_no_selection(capsys):
    key = _record(method="rtn", bits="w16a16kv3", run_key="12c0c5f2fa51bdcb")["run_key"]
    from harness.__main__ import main

    assert main(["rerun", key[:8], "--print"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"# {key}") and "python -m harness run model=smollm2-135m method=rtn" in printed
    assert printed.rstrip().endswith("force=true")
    assert rerun.main([]) == 2
    assert "--missing" in capsys.readouterr().err
