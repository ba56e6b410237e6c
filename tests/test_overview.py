"""The perplexity-at-a-glance table and the seed-spread table (harness/overview.py)."""

from harness.report import render_leaderboard
from tests.records_fixture import PROTOCOL, QUAROT_NOW, _record, as_recipe


def _glance(board: str, table: str = "### Perplexity at a glance: recipes") -> str:
    start = board.index(table)
    return board[start : board.index("\n### ", start + 1)]


def test_overview_pivots_settings_by_method_and_bolds_the_best_recipe():
    records = [
        as_recipe(_record("fp", "rtn", "w16a16kv16", 10.0)),
        as_recipe(_record("g3", "gptq", "w3g128a16kv16", 12.0)),
        as_recipe(_record("r3", "rtn", "w3g128a16kv16", 15.0)),
        as_recipe(_record("q3", "quarot", "w3g128a16kv16", 13.0, params=dict(QUAROT_NOW))),
        as_recipe(_record("r2", "rtn", "w2a4kv4", 900.0)),
        as_recipe(_record("g2", "gptq", "w2a4kv4", None, status="FAILED", error="boom")),
    ]
    lines = _glance(render_leaderboard(records)).splitlines()
    assert lines[2] == "| bits | gptq | quarot | rtn |"
    assert "| `w16a16kv16` | – | – | 10.00 |" in lines
    assert "| `w3g128a16kv16` | **12.00** | 13.00 | 15.00 |" in lines
    assert "| `w2a4kv4` | – | – | 900.00 |" in lines  # the failed GPTQ run is not a number


def test_an_ablation_that_beats_the_recipe_stays_out_of_the_headline_and_shows_its_count_in_table_2():
    """Issue 49: the headline shows each method's recipe; a variant that did better is in "Best over all
    configurations" with the number of configurations it was chosen from; a setting where only variants ran says
    so instead of borrowing the variant's number."""
    recipe = as_recipe(_record("s", "spinquant", "w4a4kv4", 44.0))
    ablation = as_recipe(_record("sa", "spinquant", "w4a4kv4", 40.0, params={"variant": "no_had", "loop.steps": "0"}))
    ablation["method_params"]["solve_dtype"] = "float32"  # a current run (older ones lack the parameter)
    other_budget = _record("sb", "spinquant", "w4a4kv4", 41.0)  # the recipe's settings at another budget
    other_budget["metrics"]["calib_windows"] = 16.0
    other_budget["act"], other_budget["kv"] = dict(recipe["act"]), dict(recipe["kv"])
    only_variant = as_recipe(_record("sw", "spinquant", "w4a8kv8", 25.0, params={"variant": "no_had"}))
    only_variant["method_params"]["solve_dtype"] = "float32"
    quarot = as_recipe(_record("q", "quarot", "w4a4kv4", 46.0, params=dict(QUAROT_NOW)))
    board = render_leaderboard([recipe, ablation, other_budget, only_variant, quarot])
    glance, best = _glance(board), _glance(board, "### Best over all configurations")
    assert "| `w4a4kv4` | 46.00 | **44.00** |" in glance
    assert "| `w4a8kv8` | – | recipe not run (best variant 25.00) |" in glance
    assert "| `w4a8kv8` | – | 25.00¹ |" in best
    assert "| `w4a4kv4` | 46.00 | **40.00**² (best of 3) |" in best  # quarot unmarked: its recipe is its best
    assert "; ¹ spinquant (variant=no_had) [ptq-cpu]; ² spinquant (variant=no_had, loop.steps=0) [ptq-cpu]." in best
    assert "40.00" not in glance and "41.00" not in glance


def test_a_method_family_runs_its_recipe_at_its_declared_budget():
    from harness.cli_sweep import group_options
    from harness.recipes import family, family_budgets, is_recipe
    from methods import METHODS

    assert (family("gptq", "rtn"), family("rcp", "rtn"), family("rtn", "kvquant")) == ("ptq", "qat", "kv")
    assert {entry.family for entry in METHODS.values()} <= {"ptq", "qat"}
    assert set(family_budgets().values()) <= set(group_options("budget"))  # each names a budget preset
    qat = as_recipe(_record("p", "paretoq", "w2a16kv16", 100.0))
    assert qat["protocol"]["budget"] == family_budgets()["qat"] and is_recipe(qat)
    assert not is_recipe({**qat, "protocol": {**qat["protocol"], "budget": "full"}})
    assert not is_recipe({**qat, "method_params": {"loop.lr": "0.1"}})
    rtn = as_recipe(_record("r", "rtn", "w4g128a16kv16", 30.0))
    assert is_recipe({**rtn, "protocol": {**rtn["protocol"], "budget": "full"}})  # read no data: any budget
    quarot = as_recipe(_record("q", "quarot", "w4a4kv4", 46.0, params=dict(QUAROT_NOW)))
    assert quarot["act"]["clip_ratio"] == "0.9" and is_recipe(quarot)  # QuaRot's act recipe is part of its recipe
    assert not is_recipe({**quarot, "act": {**quarot["act"], "clip_ratio": "1.0"}})


def test_seeds_are_one_cell_with_a_confidence_interval_and_ties_are_marked():
    """Three seeds of one method: mean ± 95% CI (t with 2 df); a method not significantly different from the
    best over paired windows is marked ≈, a clearly worse one is not."""
    import random

    rng = random.Random(0)
    base = [3.0 + 0.2 * rng.random() for _ in range(40)]
    records = [as_recipe(_record("fp", "rtn", "w16a16kv16", 20.0))]
    for seed, ppl in enumerate((30.0, 32.0, 34.0)):
        rec = _record(f"q{seed}", "quarot", "w4a4kv4", ppl, start=seed + 2)
        rec["protocol"] = {**PROTOCOL, "seed": str(seed)}
        rec["window_nll"] = [b + 0.01 * seed for b in base]
        records.append(as_recipe(rec))
    close = _record("g", "gptq", "w4a4kv4", 32.1, start=9)
    close["window_nll"] = [b + 0.01 + rng.gauss(0, 0.05) for b in base]
    worse = _record("r", "rtn", "w4a4kv4", 60.0, start=10)
    worse["window_nll"] = [b + 0.5 + rng.gauss(0, 0.01) for b in base]
    text = render_leaderboard(records + [as_recipe(close), as_recipe(worse)])
    row = next(line for line in text.splitlines() if line.startswith("| `w4a4kv4` |"))
    assert "**32.00 ± 4.97 (3)**" in row  # mean 32, s = 2, t(0.975, 2) = 4.303: 4.303 * 2 / sqrt(3)
    assert "32.10 ≈" in row and "60.00 |" in row and "60.00 ≈" not in row
    assert "± = 95% confidence interval" in text and "≈ = not significantly different" in text
    assert "| quarot (seed 1) |" in text  # the per-setting table keeps every seed's row


def test_seed_spread_is_set_against_the_nearest_other_method_not_a_variant_of_the_same_one():
    """quarot's recipe at seeds 0-2 (30, 32, 34: spread 4, mean 32); its own variant at 32.5 is not another method
    (nor is any variant: recipes only); gptq at
    35 is the nearest other method (gap 3, 0.75 of the spread: within seed noise), rtn at 60 is farther."""
    records = [as_recipe(_record("fp", "rtn", "w16a16kv16", 20.0))]
    for seed, ppl in enumerate((30.0, 32.0, 34.0)):
        rec = _record(f"q{seed}", "quarot", "w4a4kv4", ppl, start=seed + 2)
        rec["protocol"] = {**PROTOCOL, "seed": str(seed)}
        records.append(as_recipe(rec))
    records.append(_record("qv", "quarot", "w4a4kv4", 32.5, params={**QUAROT_NOW, "weights": "rtn"}))
    records += [as_recipe(_record("g", "gptq", "w4a4kv4", 35.0)), as_recipe(_record("r", "rtn", "w4a4kv4", 60.0))]
    text = render_leaderboard(records)
    assert "### Seed spread against the gaps between methods" in text
    rows = [line for line in text.splitlines() if line.startswith("| `w4a4kv4` | quarot |")]
    assert rows == ["| `w4a4kv4` | quarot | 3 | 30.00 – 34.00 | 4.00 | gptq (35.00) | 3.00 | 0.75× | – |"]
    assert "Seed spread" not in render_leaderboard(records[:1] + records[4:])  # one seed per column: no table
    for seed, ppl in enumerate((35.0, 36.0, 37.0)):  # gptq at three seeds: Welch's t between the seed sets
        rec = _record(f"g{seed}", "gptq", "w4a4kv4", ppl, start=seed + 20)
        rec["protocol"] = {**PROTOCOL, "seed": str(seed)}
        records.append(as_recipe(rec))
    text = render_leaderboard([r for r in records if r["run_key"] != "g"])
    row = next(line for line in text.splitlines() if line.startswith("| `w4a4kv4` | quarot |"))
    # means 32 vs 36, variances 4 and 1: t = 4 / sqrt(5/3) = 3.10, Welch-Satterthwaite df = 2.94, p = 0.055
    assert row.endswith("| gptq (36.00) | 4.00 | 1.00× | 0.055 |")
