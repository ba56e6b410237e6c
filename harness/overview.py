"""A protocol section's summary tables: perplexity at a glance (bit settings × methods, seeds as mean ± CI,
ties by a paired test) and the seed spread set against the gaps between methods (issue 19 item 2)."""

from __future__ import annotations

import re

import pandas as pd

from harness.recipes import family_budgets
from harness.spec import BitSpec
from harness.stats import SIGNIFICANCE, mean_ci, paired_p_value, welch_p_value
from harness.zs_fold import zs_scope_marks


def bits_order(bits: str) -> tuple:
    spec = BitSpec.parse(bits)
    return (-spec.w, -spec.a, -spec.kv, -(spec.group or 10**9))


def fmt(value, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "–"
    return f"{value:,.{digits}f}"


def _finished_cells(group: pd.DataFrame) -> pd.DataFrame:
    """A section's FINISHED runs with a PPL, each with its `column` (the method with its act/KV plug-ins, no
    options: "gptq + kv=kvquant"), its `variant` (the row label plus the budget: what "best of N" counts) and
    `config` (the variant plus the plug-ins' settings the label leaves out: runs sharing it are seeds)."""
    done = group[(group.status == "FINISHED") & group.ppl.notna()].copy()
    if done.empty:
        return done
    done["column"] = [method_of(label) for label in done.method]
    done["variant"] = [f"{label} [{budget}]" for label, budget in zip(done.method, done.p_budget, strict=True)]
    done["config"] = done.variant + " " + done.plugins
    return done


def recipe_cells(done: pd.DataFrame) -> pd.DataFrame:
    """Per (bits, column), the recipe runs (harness/recipes.py) of its latest recipe configuration — seeds of one
    recipe are one cell; where defaults changed between recipe runs, the newest configuration stands."""
    recipes = done[done.recipe]
    if recipes.empty:
        return recipes
    latest = recipes.groupby(["bits", "column", "config"]).end_time.max().reset_index()
    keep = latest.loc[latest.groupby(["bits", "column"]).end_time.idxmax(), ["bits", "column", "config"]]
    return recipes.merge(keep, on=["bits", "column", "config"])


def ppl_overview(group: pd.DataFrame) -> list[str]:
    """One protocol section at a glance, recipes only (issue 49): bit settings × methods (a method with its
    act/KV plug-ins is one column), each cell the WikiText-2 PPL of the method's recipe (its default configuration
    at its family's budget, `conf/recipes.yaml`), the lowest per setting in bold. Seeds of the recipe are one
    value, mean ± 95% CI; ≈ marks a cell not significantly different from the setting's best (paired t-test over
    the evaluation windows' NLL, p ≥ 0.05). Where only variants ran, the cell says so and points to "Best over all
    configurations" instead of borrowing a variant's number."""
    done = _finished_cells(group)
    if done.empty:
        return []
    methods = sorted(done.column.unique())
    recipes = recipe_cells(done)
    lines = ["### Perplexity at a glance: recipes", "", *_header(methods)]
    seeds_shown = ties_shown = missing_shown = False
    for bits in sorted(done.bits.unique(), key=bits_order):
        cells = {column: _overview_cell(runs) for column, runs in recipes[recipes.bits == bits].groupby("column")}
        texts, ties = _ranked_texts(cells)
        ties_shown |= ties
        row = []
        for method in methods:
            if method in texts:
                seeds_shown |= "±" in texts[method]
                row.append(texts[method])
                continue
            variants = done[(done.bits == bits) & (done.column == method)]
            if variants.empty:
                row.append("–")
                continue
            best = min(_overview_cell(runs)[0] for _, runs in variants.groupby("config"))
            row.append(f"recipe not run (best variant {fmt(best)})")
            missing_shown = True
        lines.append(f"| `{bits}` | " + " | ".join(row) + " |")
    budgets = ", ".join(f"{family} `{budget}`" for family, budget in family_budgets().items())
    notes = [
        f"Each cell is the method's recipe: its registered default configuration at its family's budget ({budgets}; "
        "a run that read no data counts at any budget), bits and seed free; every other configuration is in "
        '"Best over all configurations" below'
    ]
    if missing_shown:
        notes.append('"recipe not run": only variants ran at that setting (table 2 names them)')
    notes += _notes(seeds_shown, ties_shown)
    return lines + ["", f"*{'; '.join(notes)}.*", ""]


def zeroshot_overview(group: pd.DataFrame) -> list[str]:
    """The at-a-glance table's second panel (issue 47 item 3): per bit setting, the recipe with the lowest PPL (the
    bold cell above) and its average zero-shot accuracy (mean over its seeds that ran zero-shot), with the gap to
    the FP row where both were scored on the same documents. Only in sections where some run has zero-shot."""
    done = _finished_cells(group)
    if done.empty or not any("zs.avg" in metrics for metrics in done.metrics):
        return []
    recipes = recipe_cells(done)
    marks = zs_scope_marks(done)
    fp = done[done.bits == "w16a16kv16"]
    fp = fp[[("zs.avg" in metrics) for metrics in fp.metrics]]
    fp_avg = (float(fp.metrics.iloc[0]["zs.avg"]), fp.zs_scope.iloc[0]) if len(fp) else None
    lines = [
        "### Zero-shot at a glance: the best recipe of each setting",
        "",
        "| bits | best recipe (lowest PPL) | PPL | avg zero-shot | Δ avg vs FP |",
        "|---|---|---:|---:|---:|",
    ]
    for bits in sorted(done.bits.unique(), key=bits_order):
        cells = {column: _overview_cell(runs) for column, runs in recipes[recipes.bits == bits].groupby("column")}
        if not cells:
            continue
        best = min(cells, key=lambda column: (cells[column][0], column))
        runs = recipes[(recipes.bits == bits) & (recipes.column == best)]
        scored = runs[[("zs.avg" in metrics) for metrics in runs.metrics]]
        average, delta = "–", "–"
        if len(scored):
            value = 100 * sum(float(m["zs.avg"]) for m in scored.metrics) / len(scored)
            scope = scored.zs_scope.iloc[0]
            seeds = f" ({len(scored)} seeds)" if len(scored) > 1 else ""
            average = f"{value:.1f}{marks.get(scope, '')}{seeds}"
            if fp_avg is not None and fp_avg[1] == scope and scored.zs_scope.nunique() == 1:
                delta = f"{value - 100 * fp_avg[0]:+.1f}"
        lines.append(f"| `{bits}` | {best} | {cells[best][1]} | {average} | {delta} |")
    note = (
        "Each row is the setting's bold cell of the table above; avg zero-shot = the mean of the row's task "
        "accuracies in % (– = not run on that row); Δ only between rows scored on the same documents"
    )
    return lines + ["", f"*{note}.*", ""]


def best_overview(group: pd.DataFrame) -> list[str]:
    """Table 2 (issue 49): per setting and method, the lowest mean PPL over every configuration that ran (options,
    budgets, plug-in settings; seeds of one configuration are one value), with the number of configurations it was
    chosen from, so selection is never hidden. A superscript names the configuration."""
    done = _finished_cells(group)
    if done.empty:
        return []
    methods = sorted(done.column.unique())
    lines = ["### Best over all configurations", "", *_header(methods)]
    seeds_shown = ties_shown = False
    named: dict[str, int] = {}  # configuration name -> its footnote number, in order of first appearance
    for bits in sorted(done.bits.unique(), key=bits_order):
        at_bits = done[done.bits == bits]
        cells, chosen, counts = {}, {}, {}
        for method, runs in at_bits.groupby("column"):
            configs = {config: _overview_cell(seeds) for config, seeds in runs.groupby("config")}
            best = min(configs, key=lambda config: (configs[config][0], config))
            cells[method], counts[method] = configs[best], len(configs)
            best_runs = runs[runs.config == best]
            chosen[method] = None if best_runs.recipe.all() else best_runs.variant.iloc[0]
        texts, ties = _ranked_texts(cells)
        ties_shown |= ties
        row = []
        for method in methods:
            if method not in texts:
                row.append("–")
                continue
            seeds_shown |= "±" in texts[method]
            text = texts[method].replace(" ≈", "")
            if chosen[method] is not None:  # a variant, named in the note; an unmarked cell is the recipe
                text += _superscript(named.setdefault(chosen[method], len(named) + 1))
            text += f" (best of {counts[method]})" if counts[method] > 1 else ""
            row.append(text + (" ≈" if texts[method].endswith(" ≈") else ""))
        lines.append(f"| `{bits}` | " + " | ".join(row) + " |")
    legend = "".join(f"; {_superscript(number)} {name}" for name, number in named.items())
    notes = [
        "Each cell is the method's best configuration at that setting, chosen after the fact from the number of "
        "configurations in brackets; unmarked = the recipe, a superscript names a variant (configuration "
        f"[budget]){legend}",
        *_notes(seeds_shown, ties_shown),
    ]
    return lines + ["", f"*{'; '.join(notes)}.*", ""]


def _header(methods: list[str]) -> list[str]:
    return ["| bits | " + " | ".join(methods) + " |", "|---|" + "---:|" * len(methods)]


def _ranked_texts(cells: dict[str, tuple[float, str, list[float]]]) -> tuple[dict[str, str], bool]:
    """Each column's cell text, the lowest in bold (ties at the shown precision all bold), ≈ where a paired test
    over windows finds no significant gap to the lowest; and whether any ≈ was written."""
    best = min(cells, key=lambda column: (cells[column][0], column)) if len(cells) > 1 else None
    texts, ties = {}, False
    for column, (mean, text, nll) in cells.items():
        if best is not None and fmt(mean) == fmt(cells[best][0]):
            text = f"**{text}**"
        elif best is not None and paired_p_value(nll, cells[best][2]) >= SIGNIFICANCE:
            text, ties = text + " ≈", True
        texts[column] = text
    return texts, ties


def _notes(seeds_shown: bool, ties_shown: bool) -> list[str]:
    notes = []
    if seeds_shown:
        notes.append("± = 95% confidence interval of the mean over seeds (Student's t), number of seeds in brackets")
    if ties_shown:
        notes.append(
            f"≈ = not significantly different from the row's best (paired t-test over windows, p ≥ {SIGNIFICANCE})"
        )
    return notes


def _superscript(number: int) -> str:
    return str(number).translate(str.maketrans("0123456789", "⁰¹²³⁴⁵⁶⁷⁸⁹"))


def _overview_cell(runs: pd.DataFrame) -> tuple[float, str, list[float]]:
    """(mean PPL, cell text, per-window NLL averaged over the runs' seeds — [] when not logged)."""
    ppls = [float(p) for p in runs.ppl]
    mean, half = mean_ci(ppls)
    text = fmt(mean) if len(ppls) == 1 else f"{fmt(mean)} ± {fmt(half)} ({len(ppls)})"
    series = [s for s in runs.window_nll if isinstance(s, list) and s]
    nll = (
        [sum(values) / len(values) for values in zip(*series, strict=True)]
        if series and len(series) == len(ppls) and len({len(s) for s in series}) == 1
        else []
    )
    return mean, text, nll


def seed_spread(group: pd.DataFrame) -> list[str]:
    """Each recipe cell of the overview that holds several seeds, set against the nearest other method: the spread
    of its PPL over seeds (max − min) and the gap between its mean and the closest mean PPL of another method's
    recipe at the same bit setting (variants are not compared: issue 49). A gap smaller than the spread means the
    order of those two methods is within seed noise. Where the nearest other method has several seeds too, Welch's
    t-test between the two seed sets gives the p-value of that gap."""
    done = _finished_cells(group)
    if not done.empty:
        done = recipe_cells(done)
    if done.empty or done.groupby(["bits", "column"]).p_seed.nunique().max() < 2:
        return []
    lines = [
        "### Seed spread against the gaps between methods",
        "",
        "| bits | method | seeds | PPL over seeds (min – max) | spread | nearest other method | gap in mean PPL "
        "| gap ÷ spread | Welch p |",
        "|---|---|---:|---:|---:|---|---:|---:|---:|",
    ]
    for bits in sorted(done.bits.unique(), key=bits_order):
        means = {column: float(runs.ppl.mean()) for column, runs in done[done.bits == bits].groupby("column")}
        for column, runs in done[done.bits == bits].groupby("column"):
            if runs.p_seed.nunique() < 2:
                continue
            low, high = float(runs.ppl.min()), float(runs.ppl.max())
            spread = high - low
            others = {other: mean for other, mean in means.items() if method_of(other) != method_of(column)}
            if others:
                nearest = min(others, key=lambda other: (abs(others[other] - means[column]), other))
                gap = abs(others[nearest] - means[column])
                ratio = "–" if spread == 0 else f"{gap / spread:,.2f}×"
                neighbour, gap_text = f"{nearest} ({fmt(others[nearest])})", fmt(gap)
                other_ppls = done[(done.bits == bits) & (done.column == nearest)].ppl
                p_value = welch_p_value([float(p) for p in runs.ppl], [float(p) for p in other_ppls])
                welch = "–" if p_value != p_value else f"{p_value:.3f}"
            else:
                neighbour, gap_text, ratio, welch = "–", "–", "–", "–"
            lines.append(
                f"| `{bits}` | {column} | {runs.p_seed.nunique()} | {fmt(low)} – {fmt(high)} | {fmt(spread)} | "
                f"{neighbour} | {gap_text} | {ratio} | {welch} |"
            )
    note = (
        "*Below 1× the two methods' order is within the seed spread. Welch p: Welch's t-test between the two "
        f"methods' PPL over seeds (– where the other method has one run); p ≥ {SIGNIFICANCE} = no significant gap.*"
    )
    return lines + ["", note, ""]


def method_of(column: str) -> str:
    """The method (with its act/KV plug-ins) of an overview column, without options or calibration budget:
    "bcq (n_codebooks=1) + act=bcq (n_codebooks=1) [16 × 2048]" -> "bcq + act=bcq"."""
    return re.sub(r" \([^)]*\)", "", column).split(" [")[0]
