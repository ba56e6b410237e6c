"""Leaderboard rendering from run records: deterministic, grouped, Δ against FP, failures shown."""

import pytest

from harness.labels import method_label
from harness.records import merge_records, select_latest
from harness.report import render_leaderboard
from tests.records_fixture import PROTOCOL, QUAROT_NOW, _record, as_recipe


def test_latest_finished_run_wins():
    records = [
        _record("a", "rtn", "w4a16kv16", 12.0, start=1),
        _record("a", "rtn", "w4a16kv16", None, status="KILLED", start=2),
        _record("b", "rtn", "w3a16kv16", None, status="FAILED", start=1),
    ]
    chosen = select_latest(records)
    assert [(r["run_key"], r["status"]) for r in chosen] == [("b", "FAILED"), ("a", "FINISHED")]


def test_a_rerun_in_progress_or_killed_does_not_hide_the_files_result_and_a_newer_result_replaces_it():
    kept = [_record("a", "rtn", "w4a16kv16", 12.0, start=1), _record("b", "rtn", "w3a16kv16", 20.0, start=1)]
    fresh = [
        _record("a", "rtn", "w4a16kv16", None, status="KILLED", start=2),
        _record("a", "rtn", "w4a16kv16", None, status="RUNNING", start=3),
        _record("b", "rtn", "w3a16kv16", 19.0, start=2),
    ]
    merged = {r["run_key"]: r for r in merge_records(kept, fresh)}
    assert (merged["a"]["status"], merged["a"]["metrics"]["wikitext2_ppl"]) == ("FINISHED", 12.0)
    assert merged["b"]["metrics"]["wikitext2_ppl"] == 19.0 and len(merged) == 2
    updated = _record("b", "rtn", "w3a16kv16", 18.0, start=1)  # the file's run, exported again with a new metric
    assert {r["run_key"]: r for r in merge_records(kept, [updated])}["b"]["metrics"]["wikitext2_ppl"] == 18.0


def test_leaderboard_is_deterministic_and_sorted():
    records = [
        _record("fp", "rtn", "w16a16kv16", 10.0),
        _record("g", "gptq", "w3g128a16kv16", 12.0),
        _record("r", "rtn", "w3g128a16kv16", 15.0),
        _record("f", "quarot", "w3g128a16kv16", None, status="FAILED", error="ValueError: boom"),
    ]
    board = render_leaderboard(records)
    assert board == render_leaderboard(list(reversed(records)))
    assert board.index("### `w16a16kv16`") < board.index("### `w3g128a16kv16`")
    table = board[board.index("### `w3g128a16kv16`") :]
    assert table.index("| gptq |") < table.index("| rtn |") < table.index("| quarot |")
    assert "+2.00 (+20.0%)" in table and "+5.00 (+50.0%)" in table and "FAILED: ValueError: boom" in table
    assert "304,986 tokens" in board and "148 windows" in board


def test_method_label_names_non_default_params():
    assert method_label("quarot", {"weights": "rtn", **QUAROT_NOW}) == "quarot (weights=rtn)"
    assert method_label("rtn", {"w_sym": "False"}) == "rtn"


def test_calibration_is_a_column_not_a_section():
    fp = _record("fp", "rtn", "w16a16kv16", 10.0)
    fp["metrics"]["calib_windows"] = 0.0
    gptq = _record("g", "gptq", "w3g128a16kv16", 12.0)
    gptq["protocol"] = {**PROTOCOL, "calib_nsamples": "16", "budget": "fullppl"}
    gptq["metrics"] |= {"calib_windows": 16.0, "latency.prefill.speedup": 0.8, "latency.decode.speedup": 0.25}
    board = render_leaderboard([fp, gptq])
    assert board.count("## m — WikiText-2 whole test split") == 1  # one section for both budgets
    assert "`fullppl`, `full`" in board or "`full`, `fullppl`" in board
    row = next(line for line in board.splitlines() if line.startswith("| gptq |"))
    assert "| 16 × 2048 |" in row and "| 0.80× / 0.25× |" in row
    fp_row = next(line for line in board.splitlines() if line.startswith("| rtn |"))
    assert "| – | 2.0 | – |" in fp_row  # no calibration data read; no kernel


def test_a_record_made_before_a_parameter_existed_is_labelled_with_its_legacy_value():
    """QuaRot rows recorded before `signs_first` existed ran with H·diag(s): the label says so, so they never
    share a row label with runs of the corrected rotation."""
    old = {"rotation": "hadamard", "weights": "gptq", "w_sym": "True", "act_order": "False"}
    assert method_label("quarot", old) == "quarot (solve_dtype=float64, signs_first=False)"
    assert method_label("quarot", {**old, **QUAROT_NOW}) == "quarot"


def test_speedup_column_prefers_the_deployed_end_to_end_figure_and_says_its_coverage():
    from harness.frame import speedup_cell

    rec = _record("d", "rtn", "w4g128a16kv16", 12.0)
    rec["metrics"].update({"latency.prefill.speedup": 0.7, "latency.decode.speedup": 0.1})
    assert speedup_cell(rec) == "0.70× / 0.10×"
    deployed = {"deploy.prefill.speedup": 0.5, "deploy.decode.speedup": 1.6, "deploy.linears_total": 210.0}
    rec["metrics"].update({**deployed, "deploy.linears_on_kernel": 210.0})
    assert speedup_cell(rec) == "0.50× / 1.60× e2e"
    rec["metrics"]["deploy.linears_on_kernel"] = 180.0
    assert speedup_cell(rec) == "0.50× / 1.60× e2e (180/210 linears)"
    rec["metrics"]["deploy.linears_on_kernel"] = 0.0
    assert speedup_cell(rec) == "no kernel"


def test_paretoq_plot_puts_our_runs_beside_the_papers_numbers(tmp_path):
    from omegaconf import OmegaConf

    from harness.plots import paretoq_points, plot_paretoq
    from harness.report import CLAIMS_DIR

    claims = OmegaConf.to_container(OmegaConf.load(CLAIMS_DIR / "paretoq.yaml"))
    assert claims["wikitext2_ppl"]["1.58"] == 20.0 and claims["model"] == "MobileLLM-125M"
    records = [_record("fp", "rtn", "w16a16kv16", 21.6)]
    assert not plot_paretoq(records, claims, tmp_path / "p.png")  # no ParetoQ run: no plot
    for key, bits, ppl, bpw in (("q2", "w2a16kv16", 60.0, 2.03), ("q1", "w1a16kv16", 900.0, 1.03)):
        rec = as_recipe(_record(key, "paretoq", bits, ppl))
        rec["metrics"]["bits_per_weight"] = bpw
        records.append(rec)
    variant = as_recipe(_record("r2q", "paretoq", "w2a16kv16", 50.0, params={"quantizer": "r2q"}))
    assert [bits for bits, _, _ in paretoq_points(records + [variant], "m")] == ["w1a16kv16", "w2a16kv16", "w16a16kv16"]
    assert plot_paretoq([{**r, "model": "smollm2-135m"} for r in records], claims, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_a_nested_parameter_that_differs_from_its_default_labels_the_row():
    params = {"loop.steps": "0", "loop.lr": "8e-06", "generation.max_new_tokens": "256", "kd_loss": "cakld"}
    assert method_label("bitdistiller", params) == "bitdistiller (loop.steps=0)"
    assert method_label("bitdistiller", {**params, "loop.steps": "null"}) == "bitdistiller"


def test_pareto_front_keeps_only_undominated_points():
    from harness.plots import pareto_front

    points = [(4.1, 1.2), (3.1, 1.5), (2.2, 3.0), (3.2, 2.0), (4.2, 1.3), (2.2, 2.5)]
    assert pareto_front(points) == [(2.2, 2.5), (3.1, 1.5), (4.1, 1.2)]


def test_settings_panel_slots_settings_by_bits_and_spreads_methods_inside():
    """The weight+activation/KV panel's x: one slot per setting in (weight, activation, KV) bits order, the
    methods of a slot side by side in name order, centred on it and inside +-0.4; seeds of a method share a spot."""
    import pandas as pd

    from harness.plots import setting_positions

    group = pd.DataFrame(
        {
            "bits": ["w4a8kv8", "w4a4kv4", "w4a4kv4", "w4a4kv4", "w2a4kv4", "w4a4kv16"],
            "method": ["rtn", "rtn", "quarot", "quarot", "gptq", "bcq"],
        }
    )
    settings, x = setting_positions(group)
    assert settings == ["w2a4kv4", "w4a4kv4", "w4a4kv16", "w4a8kv8"]
    assert x["w2a4kv4", "gptq"] == 0 and x["w4a4kv16", "bcq"] == 2 and x["w4a8kv8", "rtn"] == 3
    assert x["w4a4kv4", "quarot"] == pytest.approx(0.8) and x["w4a4kv4", "rtn"] == pytest.approx(1.2)
    assert len(x) == 5


def test_each_method_gets_a_distinct_colour():
    from harness.plots import method_colours

    for n in (3, 14, 20, 27):
        colours = method_colours([f"m{i}" for i in range(n)])
        assert len(set(colours.values())) == n


def test_pareto_panels_relative_ppl_and_kv_bits(tmp_path):
    """Whole-split runs only, each in its panel, PPL relative to the model's FP run, KV bits per element from
    the bytes per token against FP's 16 bits; collapsed runs (> CEILING x FP) kept for the ceiling."""
    from harness.plots import CEILING, pareto_frame, plot_pareto

    records = [
        as_recipe(_record("fp", "rtn", "w16a16kv16", 20.0)),
        as_recipe(_record("w4", "rtn", "w4g128a16kv16", 30.0)),
        as_recipe(_record("a4", "rtn", "w4a4kv4", 20.0 * CEILING * 3)),
        as_recipe(_record("kv3", "rtn", "w16a16kv3", 25.0)),
    ]
    records[3]["metrics"]["kv_bytes_per_token"] = 250.0  # FP: 1000 bytes at 16 bits
    subset = as_recipe(_record("sub", "rtn", "w4g128a16kv16", 31.0))
    subset["protocol"] = {**subset["protocol"], "ppl_max_windows": "16"}
    variant = as_recipe(_record("var", "rtn", "w4g128a16kv16", 29.0, params={"w_mse_clip": "True"}))
    frame = pareto_frame([*records, subset, variant]).set_index("bits")
    assert len(frame) == 3  # FP itself is no setting; the 16-window subset and the variant are not drawn
    assert frame.loc["w4g128a16kv16", "panel"] == 0 and frame.loc["w4a4kv4", "panel"] == 1
    assert frame.loc["w4g128a16kv16", "rel"] == 1.5 and frame.loc["w4a4kv4", "rel"] > CEILING
    assert frame.loc["w16a16kv3", "panel"] == 2 and frame.loc["w16a16kv3", "kv_bits"] == 4.0
    plot_pareto(records, tmp_path / "pareto.png")
    assert (tmp_path / "pareto.png").stat().st_size > 1000


def test_claims_hold_fail_or_are_not_run_with_their_numbers():
    from harness.reproduction import check_claim, render_reproduction

    records = [as_recipe(_record("fp", "rtn", "w16a16kv16", 20.0))]  # FP: the recipe RTN run
    for key, method, bits, ppl in (
        ("q", "quarot", "w4a4kv4", 40.0),
        ("r", "rtn", "w4a4kv4", 9000.0),
        ("g", "gptq", "w3g128a16kv16", 90.0),
        ("r3", "rtn", "w3g128a16kv16", 80.0),
    ):
        records.append(_record(key, method, bits, ppl))
    rescue = {
        "text": "rescue",
        "run": {"method": "quarot", "bits": "w4a4kv4"},
        "below": {"method": "rtn", "bits": "w4a4kv4"},
        "factor": 10,
    }
    assert check_claim(rescue, records, "m") == ("holds", "40.00 vs 9,000.00 (needs 10x lower)")
    gptq = {
        "text": "gptq < rtn",
        "run": {"method": "gptq", "bits": "w3g128a16kv16"},
        "below": {"method": "rtn", "bits": "w3g128a16kv16"},
    }
    assert check_claim(gptq, records, "m") == ("does not hold", "90.00 vs 80.00")
    near = {"text": "near FP", "run": {"method": "quarot", "bits": "w4a4kv4"}, "within_fp": 0.1}
    assert (
        check_claim(near, records, "m")[0] == "does not hold"
        and "+100.0%; limit +10%" in check_claim(near, records, "m")[1]
    )
    kv = {"text": "kv", "run": {"method": "rtn", "bits": "w16a16kv3", "kv": {"name": "kvquant"}}, "within_fp": 0.1}
    assert check_claim(kv, records, "m") == ("not run", "no whole-split run of rtn `w16a16kv3` (kv=kvquant)")
    near = {"text": "about equal", "run": {"method": "gptq", "bits": "w3g128a16kv16"}, "within": 0.1}
    assert check_claim({**near, "near": {"method": "rtn", "bits": "w3g128a16kv16"}}, records, "m") == (
        "does not hold",
        "90.00 vs 80.00 (+12.5%; limit ±10%)",
    )
    assert check_claim({**near, "within": 0.15, "near": {"method": "rtn", "bits": "w3g128a16kv16"}}, records, "m")[
        0
    ] == ("holds")
    text = render_reproduction(records, [{"paper": "P", "headline": {"model": "X"}, "claims": [rescue, gptq]}])
    assert "| P | X, ?, not quoted; ? | rescue | holds — 40.00" in text


def test_a_claim_compares_seed_means_and_says_whether_the_gap_exceeds_the_seed_spread():
    from harness.reproduction import check_claim

    def seeded(key, method, ppl, seed, start=1, **protocol):
        rec = _record(key, method, "w4a4kv4", ppl, start=start)
        rec["protocol"] = {**rec["protocol"], "seed": str(seed), **protocol}
        return rec

    # spinquant's luckiest seed (39) is below quarot's best seed (40), but the configurations' means are not
    records = [seeded(f"s{i}", "spinquant", p, i) for i, p in enumerate((39.0, 45.0, 48.0))]
    records += [seeded(f"q{i}", "quarot", p, i) for i, p in enumerate((40.0, 41.0, 42.0))]
    records.append(seeded("q-other", "quarot", 30.0, 0, budget="other"))  # another budget: not a seed, excluded
    claim = {
        "text": "spinquant < quarot",
        "run": {"method": "spinquant", "bits": "w4a4kv4"},
        "below": {"method": "quarot", "bits": "w4a4kv4", "params": {"budget": "full"}},
    }
    verdict, numbers = check_claim(claim, records, "m")
    assert verdict == "does not hold"
    assert numbers.startswith("44.00 ± 11.38 (3 seeds) vs 41.00 ± 2.48 (3 seeds)")
    # Welch: t = 3 / sqrt(21/3 + 1/3) = 1.108, df = 7.333² / (7²/2 + 0.333²/2) = 2.19 -> p = 0.37
    assert "the gap is within the seed spread (Welch p = 0.37)" in numbers
    records = [seeded(f"s{i}", "spinquant", p, i) for i, p in enumerate((30.0, 30.5, 31.0))]
    records += [seeded(f"q{i}", "quarot", p, i) for i, p in enumerate((40.0, 41.0, 42.0))]
    verdict, numbers = check_claim(claim, records, "m")
    assert verdict == "holds" and "the gap exceeds the seed spread" in numbers
    # a rerun of a seed replaces it (the latest counts), it is not a fourth seed
    records.append(seeded("s0-rerun", "spinquant", 31.0, 0, start=9))
    assert check_claim(claim, records, "m")[1].startswith("30.83 ± ")


def test_a_claim_matching_several_configurations_must_pin_one_or_say_best_of(tmp_path, capsys, monkeypatch):
    """Issue 49: a side that matches two configurations without saying which is ambiguous (and fails
    `report --check`); `best_of: true` picks the lower and says from how many; `recipe: true` pins the recipe."""
    import harness.report
    from harness.records import write_records
    from harness.report import main, render_leaderboard
    from harness.reproduction import AMBIGUOUS, ambiguous_claims, check_claim, render_reproduction

    recipe = as_recipe(_record("q", "quarot", "w4a4kv4", 46.0, params=dict(QUAROT_NOW)))
    variant = as_recipe(_record("qr", "quarot", "w4a4kv4", 44.0, params={**QUAROT_NOW, "weights": "rtn"}))
    records = [recipe, variant, as_recipe(_record("r", "rtn", "w4a4kv4", 9000.0))]
    claim = {
        "text": "rescue",
        "run": {"method": "quarot", "bits": "w4a4kv4"},
        "below": {"method": "rtn", "bits": "w4a4kv4"},
    }
    verdict, numbers = check_claim(claim, records, "m")
    assert verdict == AMBIGUOUS and "quarot `w4a4kv4` matches 2 configurations" in numbers
    best = {**claim, "run": {**claim["run"], "best_of": True}}
    assert check_claim(best, records, "m") == ("holds", "44.00 (best of 2 configurations) vs 9,000.00")
    pinned = {**claim, "run": {**claim["run"], "recipe": True}}
    assert check_claim(pinned, records, "m") == ("holds", "46.00 vs 9,000.00")
    claims = [{"file": "x.yaml", "paper": "P", "headline": {}, "claims": [claim]}]
    assert ambiguous_claims(records, claims) == [f"x.yaml: 'rescue' on m: {numbers}"]
    write_records(records, tmp_path / "runs.jsonl")
    (tmp_path / "leaderboard.md").write_text(render_leaderboard(records))
    (tmp_path / "reproduction.md").write_text(render_reproduction(records, claims))
    monkeypatch.setattr(harness.report, "load_claims", lambda _: claims)
    assert main(["--check", "--out", str(tmp_path)]) == 1
    assert "match several configurations without saying which" in capsys.readouterr().err


def test_every_claims_file_names_a_paper_and_checkable_claims():
    from harness.report import CLAIMS_DIR
    from harness.reproduction import load_claims

    claims = load_claims(CLAIMS_DIR)
    assert {c["file"] for c in claims} >= {"gptq.yaml", "quarot.yaml", "kvquant.yaml", "bcq.yaml", "paretoq.yaml"}
    for spec in claims:
        assert spec["paper"] and spec["headline"]["source"] and spec["claims"], spec["file"]
        for claim in spec["claims"]:
            assert {"method", "bits"} <= set(claim["run"])
            assert sum(key in claim for key in ("below", "within_fp", "near")) == 1, claim["text"]
            assert ("near" in claim) == ("within" in claim), claim["text"]


def test_a_parameter_inert_without_its_flag_is_left_out_of_the_label():
    from harness.labels import method_label

    # records from before bcq's uniform_grid existed: only the uniform row is labelled with its legacy grid
    assert method_label("bcq", {"uniform": "False", "n_codebooks": "1"}) == "bcq (n_codebooks=1)"
    assert method_label("bcq", {"uniform": "True"}) == "bcq (uniform=True, uniform_grid=midrise)"
    assert method_label("bcq", {"uniform": "True", "uniform_grid": "int4"}) == "bcq (uniform=True)"
    assert method_label("bcq", {"uniform": "False", "uniform_grid": "midrise"}) == "bcq"


def test_zero_shot_columns_and_each_runs_wall_time_are_shown():
    zs = {"zs_tasks": "['piqa', 'hellaswag']", "zs_limit": "null"}
    fp = _record("fp", "rtn", "w16a16kv16", 10.0)
    q = _record("q", "gptq", "w4g128a16kv16", 11.0)
    for rec, (piqa, hs) in ((fp, (0.70, 0.40)), (q, (0.66, 0.38))):
        rec["protocol"] |= zs
        rec["metrics"] |= {
            "zs.piqa.acc_norm": piqa,
            "zs.piqa.acc_norm_stderr": 0.01,
            "zs.piqa.seconds": 300.0,
            "zs.hellaswag_mirror.acc_norm": hs,
            "zs.hellaswag_mirror.acc_norm_stderr": 0.005,
            "zs.hellaswag_mirror.seconds": 3600.0 + 60 * (rec is q),
            "zs.avg": (piqa + hs) / 2,
        }
    board = render_leaderboard([fp, q])
    assert "with zero-shot" not in board and "lm-eval, 0-shot, whole splits" in board
    assert (
        "- Zero-shot wall time per run, all tasks (longest task): rtn · w16a16kv16 65.0 min (hellaswag_mirror 60.0); "
        "gptq · w4g128a16kv16 66.0 min (hellaswag_mirror 61.0)"
    ) in board
    row = next(line for line in board.splitlines() if line.startswith("| gptq |"))
    assert "| 66.0 ± 1.0 | 38.0 ± 0.5 | 52.0 |" in row


def test_zero_shot_gaps_the_same_documents_cannot_separate_from_fp_are_marked():
    """eval=zs1k: every run scores the same seeded documents, so each row is paired with FP's by McNemar's test:
    a row 2 documents of 100 apart is ≈, one 30 apart is not; rows without per-document outcomes get no mark."""
    zs = {"zs_tasks": "['piqa']", "zs_limit": "null", "zs_sample": "100", "zs_sample_seed": "0"}
    documents = list(range(0, 300, 3))
    outcomes = {"fp": [1] * 70 + [0] * 30, "near": [1] * 68 + [0] * 32, "far": [1] * 40 + [0] * 60}
    records = []
    for key, correct in outcomes.items():
        rec = _record(key, "rtn" if key == "fp" else key, "w16a16kv16" if key == "fp" else "w4a16kv16", 10.0)
        rec["protocol"] |= zs
        accuracy = sum(correct) / 100
        rec["metrics"] |= {"zs.piqa.acc_norm": accuracy, "zs.piqa.seconds": 60.0, "zs.avg": accuracy}
        rec["zs_documents"] = {"piqa": {"documents": documents, "correct": correct}}
        records.append(rec)
    unpaired = _record("old", "old", "w4a16kv16", 10.0)
    unpaired["protocol"] |= zs
    unpaired["metrics"] |= {"zs.piqa.acc_norm": 0.69, "zs.piqa.seconds": 60.0, "zs.avg": 0.69}
    board = render_leaderboard([*records, unpaired])
    assert "the same 100 documents per task for every run (seeded subset, seed 0" in board
    assert "≈ = not separable from the FP row on the same documents" in board
    rows = {line.split(" |")[0][2:]: line for line in board.splitlines() if line.startswith("| ")}
    assert "| 68.0 ≈ |" in rows["near"] and "| 40.0 |" in rows["far"] and "| 69.0 |" in rows["old"]


def _zs_run(key, method, bits, ppl, piqa, scope, start=2):
    rec = _record(key, method, bits, ppl, start=start)
    rec["protocol"] |= {"zs_tasks": "['piqa']", "zs_limit": "null"} | scope
    rec["metrics"] |= {"zs.piqa.acc_norm": piqa, "zs.piqa.seconds": 60.0, "zs.avg": piqa}
    return rec


def test_a_zero_shot_run_folds_into_the_row_of_the_same_model_and_no_ppl_moves():
    """Issue 47 item 3: one section, one row per model; a zero-shot run of another model (another PPL) stays a row."""
    fp, q = _record("fp", "rtn", "w16a16kv16", 10.0), _record("q", "gptq", "w4g128a16kv16", 11.0)
    q_zs = _zs_run("q-zs", "gptq", "w4g128a16kv16", 11.0 * (1 + 3e-8), 0.61, {})  # same model, another code version
    other = _zs_run("other", "gptq", "w4g128a16kv16", 11.5, 0.59, {})  # a different model: not folded
    board = render_leaderboard([fp, q, q_zs, other])
    assert board.count("## m — WikiText-2") == 1
    rows = [line for line in board.splitlines() if line.startswith("| gptq |")]
    assert len(rows) == 2
    assert "| 11.00 |" in rows[0] and "| 61.0 | 61.0 |" in rows[0]  # q's own PPL, q_zs's accuracy and avg
    assert "| 11.50 |" in rows[1] and "| 59.0 | 59.0 |" in rows[1]
    fp_row = next(line for line in board.splitlines() if line.startswith("| rtn |"))
    assert "| – | – |" in fp_row  # piqa and avg not run


def test_several_document_sets_are_lettered_and_the_glance_panel_shows_the_best_recipes_average():
    fp = _record("fp", "rtn", "w16a16kv16", 10.0)
    zs1k = {"zs_sample": "1000", "zs_sample_seed": "0"}
    fp_sampled = _zs_run("fp-1k", "rtn", "w16a16kv16", 10.0, 0.70, zs1k)
    fp_whole = _zs_run("fp-whole", "rtn", "w16a16kv16", 10.0, 0.72, {})
    q = _zs_run("q", "gptq", "w4g128a16kv16", 11.0, 0.66, zs1k)
    old = _zs_run("old", "rtn", "w4g128a16kv16", 12.0, 0.65, {"zs_limit": "200"})
    board = render_leaderboard([as_recipe(r) for r in (fp, fp_sampled, fp_whole, q, old)])
    assert "ᵃ first 200 documents per task; ᵇ the same 1,000 documents per task" in board
    assert (
        "- The same model on other zero-shot documents: rtn · w16a16kv16 on whole splits: piqa 72.0, avg 72.0" in board
    )
    fp_row = next(line for line in board.splitlines() if line.startswith("| rtn |") and "| 10.00 |" in line)
    assert "| 70.0 | 70.0ᵇ |" in fp_row  # the seeded sample is the row's: it pairs with the methods' rows
    panel = board[board.index("### Zero-shot at a glance") :].split("\n\n")[1].splitlines()
    assert panel[2] == "| `w16a16kv16` | rtn | 10.00 | 70.0ᵇ | +0.0 |"
    assert panel[3] == "| `w4g128a16kv16` | gptq | 11.00 | 66.0ᵇ | -4.0 |"


def test_the_header_counts_quantized_runs_without_kl_and_names_the_command_that_fills_them():
    fp = _record("fp", "rtn", "w16a16kv16", 10.0)
    old = _record("old", "rtn", "w4g128a16kv16", 12.0)
    new = _record("new", "gptq", "w4g128a16kv16", 11.0)
    new["metrics"] |= {"kl_vs_fp": 0.05, "top1_vs_fp": 0.9}
    board = render_leaderboard([fp, old, new])
    assert "- KL/top-1 vs FP: 1 of 2 quantized runs were logged before the fidelity pass" in board
    assert "python -m harness rerun --missing kl_vs_fp" in board
    old["metrics"] |= {"kl_vs_fp": 0.2, "top1_vs_fp": 0.7}
    assert "KL/top-1 vs FP:" not in render_leaderboard([fp, old, new])


def test_speedups_timed_on_different_hardware_are_marked_and_named_in_the_header():
    fp = as_recipe(_record("fp", "rtn", "w16a16kv16", 10.0))  # recipes: no variant footnotes in table 2
    runs = [
        as_recipe(_record("a", "rtn", "w4g128a16kv16", 12.0)),
        as_recipe(_record("b", "gptq", "w4g128a16kv16", 11.0)),
    ]
    for rec, prefill in zip(runs, (0.9, 0.2), strict=True):
        rec["metrics"] |= {"latency.prefill.speedup": prefill, "latency.decode.speedup": 0.5}
    runs[1]["latency_hardware"] = "AMD EPYC (avx2)"
    board = render_leaderboard([fp, *runs])
    assert "| 0.20× / 0.50×¹ |" in board and "| 0.90× / 0.50×² |" in board  # the unrecorded machine marked last
    assert "¹ AMD EPYC (avx2) (1 run); ² not recorded (1 run timed before the hardware was logged)" in board
    runs[0]["latency_hardware"] = "AMD EPYC (avx2)"
    board = render_leaderboard([fp, *runs])
    assert "- Speedups timed on: AMD EPYC (avx2) (2 runs)" in board
    assert "| 0.90× / 0.50× |" in board and "¹" not in board


def test_the_header_names_the_package_versions_runs_ran_with():
    fp = _record("fp", "rtn", "w16a16kv16", 10.0)
    runs = [_record("a", "rtn", "w4g128a16kv16", 12.0), _record("b", "gptq", "w4g128a16kv16", 11.0)]
    versions = {"torch": "2.13.0+cpu", "transformers": "5.25.0", "lm_eval": "0.4.13", "auto_round": "0.16.1",
                "mlflow": "3.17.2", "triton": "3.9.0", "quantbench": "0.1.0"}  # fmt: skip
    runs[0]["versions"] = versions
    runs[1]["versions"] = versions | {"transformers": "5.24.0"}
    board = render_leaderboard([fp, *runs])
    line = next(line for line in board.splitlines() if line.startswith("- Package versions:"))
    older = "torch 2.13.0+cpu, transformers 5.24.0, lm_eval 0.4.13, auto_round 0.16.1, mlflow 3.17.2, triton 3.9.0"
    assert f"{older} (1 runs)" in line
    assert "transformers 5.25.0" in line and line.endswith("not recorded for 1 runs (logged before versions were kept)")


def test_training_loss_curves_are_drawn_per_setting_for_runs_that_kept_them(tmp_path):
    from harness.plots import loss_curve_runs, plot_training_loss

    kept = [_record(k, "rcp", bits, ppl) for k, bits, ppl in (("a", "w2a4kv4", 90.0), ("b", "w4a4kv4", 30.0))]
    for rec in kept:
        rec["train_loss"] = [3.0, 2.0, 1.5]
    subset = _record("s", "rcp", "w2a4kv4", 80.0)
    subset["train_loss"] = [1.0]
    subset["protocol"] = {**subset["protocol"], "ppl_max_windows": "4"}  # not the whole split: not drawn
    older = _record("o", "rcp", "w2a4kv4", 95.0)  # logged before curves were kept
    panels = loss_curve_runs([*kept, subset, older], "rcp", model=kept[0]["model"])
    assert list(panels) == ["w4a4kv4", "w2a4kv4"] and [r["run_key"] for r in panels["w2a4kv4"]] == ["a"]
    assert plot_training_loss([*kept, older], "rcp", tmp_path / "loss" / "rcp.png", model=kept[0]["model"])
    assert (tmp_path / "loss" / "rcp.png").stat().st_size > 1000
    assert not plot_training_loss([older], "rcp", tmp_path / "none.png", model=kept[0]["model"])
    assert not (tmp_path / "none.png").exists()


def test_names_of_methods_at_the_same_bits_are_spread_until_none_overlap():
    """AWQ, both GPTQs and RTN at W4 g64 share 4.31 b/w and nearly the same PPL: their names must not overlap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from harness.plots import _name_point, spread_labels

    fig, ax = plt.subplots(figsize=(5, 4))
    ax.set_yscale("log")
    ax.set_xlim(1, 4.5)
    ax.set_ylim(0.9, 16)
    points = [(4.31, 1.16), (4.31, 1.17), (4.31, 1.21), (4.3, 1.32), (3.1, 2.0)]
    labels = [_name_point(ax, f"method{i}", p, "black") for i, p in enumerate(points)]
    renderer = fig.canvas.get_renderer()

    def overlapping():
        boxes = [a.get_window_extent(renderer) for a in labels]
        return sum(boxes[i].overlaps(boxes[j]) for i in range(len(boxes)) for j in range(i))

    assert overlapping() > 0  # the case this exists for
    spread_labels(ax, labels)
    assert overlapping() == 0
    assert labels[4].xyann == (5, 3)  # a label clear of the others stays where it was
    assert [a.get_window_extent(renderer).y0 for a in labels[:4]] == sorted(
        a.get_window_extent(renderer).y0 for a in labels[:4]
    )  # stacked in the order of their points' height
    plt.close(fig)


def test_a_claim_between_two_training_runs_plots_both_loss_curves_on_one_panel(tmp_path):
    """R2Q's claim (issue 43) is about convergence as well as PPL: the claim plot holds the loss per step of the
    two runs the verdict reads, and leaves out a claim whose other side kept no loss curve."""
    from harness.plots import claim_loss_pairs, plot_claim_losses

    r2q = _record("r2q", "paretoq", "w2a16kv16", 900.0, params={"quantizer": "r2q"})
    seq = _record("seq", "paretoq", "w2a16kv16", 2900.0, params={"quantizer": "paretoq"})
    int2 = _record("int2", "bitdistiller", "w2g64a16kv16", 485.0)
    r2q_g64 = _record("r2qg", "r2q", "w2g64a16kv16", 400.0)
    for rec, curve in ((r2q, [5.0, 4.0, 3.5]), (seq, [6.0, 5.5, 5.0]), (r2q_g64, [2.0, 1.0])):
        rec["train_loss"] = curve
    claims = {
        "claims": [
            {
                "text": "R2Q below SEQ",
                "run": {"method": "paretoq", "bits": "w2a16kv16", "params": {"quantizer": "r2q"}},
                "below": {"method": "paretoq", "bits": "w2a16kv16", "params": {"quantizer": "paretoq"}},
            },
            {
                "text": "R2Q below INT2",
                "run": {"method": "r2q", "bits": "w2g64a16kv16"},
                "below": {"method": "bitdistiller", "bits": "w2g64a16kv16"},
            },
        ]
    }
    records = [r2q, seq, int2, r2q_g64]
    pairs = claim_loss_pairs(records, claims, model="m")
    assert [(text, run["run_key"], other["run_key"]) for text, run, other in pairs] == [("R2Q below SEQ", "r2q", "seq")]
    assert plot_claim_losses(records, claims, tmp_path / "loss" / "claims-r2q.png", model="m")
    assert (tmp_path / "loss" / "claims-r2q.png").stat().st_size > 1000
    int2["train_loss"] = [3.0, 2.5]
    assert len(claim_loss_pairs(records, claims, model="m")) == 2
    assert not plot_claim_losses(records, {"claims": []}, tmp_path / "none.png", model="m")
