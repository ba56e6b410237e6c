"""`reports/pareto.png` (PPL relative to FP against true bits or bit setting, per model and kind of setting),
`reports/paretoq.png` (ParetoQ's size-vs-quality curve beside the paper's), `reports/loss/<method>.png` (the
training methods' loss per step) and `reports/loss/claims-<file>.png` (the two loss curves of each claim between
training runs)."""

from __future__ import annotations

import math
from pathlib import Path

from harness.frame import records_frame, whole_split
from harness.labels import row_label
from harness.overview import bits_order, fmt, method_of
from harness.recipes import is_recipe
from methods.core.atomic import atomic_write
from methods.core.bits import BitSpec

CEILING = 10.0  # PPL relative to FP above which a run counts as collapsed and is drawn on the ceiling
PANELS = (
    ("weights only (a16 kv16)", "bpw", "true bits per weight (quantized linears, incl. scales)"),
    (
        "weights + activations and/or KV cache",
        "setting",
        "bit setting (true bits per weight below it); methods left to right in legend order",
    ),
    ("KV cache only (16-bit weights)", "kv_bits", "true KV-cache bits per element (codes, scales, outliers)"),
)


def _panel_of(bits: str) -> int | None:
    spec = BitSpec.parse(bits)
    if spec.w < 16:
        return 0 if spec.a >= 16 and spec.kv >= 16 else 1
    return 2 if spec.kv < 16 else None


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both axes (fewer bits and lower PPL), by increasing bits."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points):
        if not front or y < front[-1][1]:
            if front and x == front[-1][0]:
                front[-1] = (x, y)
            else:
                front.append((x, y))
    return front


def pareto_frame(records: list[dict]):
    """Whole-split finished recipe runs (harness/recipes.py; variants are in the leaderboard's "Best over all
    configurations") with their panel, PPL relative to the model's FP run and KV bits per element;
    None when no model has an FP run on the whole split."""
    frame = records_frame(records)
    frame = frame[(frame.status == "FINISHED") & frame.ppl.notna() & frame.bpw.notna()]
    frame = frame.loc[frame.p_ppl_max_windows.map(whole_split).astype(bool) & frame.recipe].copy()
    frame["method"] = frame.method.map(method_of)  # its column: method + plug-ins
    fp = (
        frame[frame.bits == "w16a16kv16"].groupby(["model", "protocol"]).agg(fp_ppl=("ppl", "min"), fp_kv=("kv", "max"))
    )
    frame = frame.join(fp, on=["model", "protocol"], how="inner")
    if frame.empty:
        return None
    frame["panel"] = frame.bits.map(_panel_of)
    frame = frame[frame.panel.notna()].copy()
    frame["rel"] = frame.ppl / frame.fp_ppl
    frame["kv_bits"] = 16 * frame.kv / frame.fp_kv
    return frame


def plot_pareto(records: list[dict], path: Path) -> None:
    """PPL relative to FP, whole test split only (budget subsets stay in the tables): one row per model, panels
    for weight-only and KV-only settings against true bits (per method a line through its Pareto-optimal points,
    dominated runs hollow) and, between them, weight+activation/KV settings, which share ~4 bits per weight, one
    slot per setting; one colour per method, the same in every panel, and each method's name written next to
    its line or points; runs above CEILING x FP drawn on the ceiling with their PPL in the legend; the FP line at
    1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frame = pareto_frame(records)
    if frame is None or frame.empty:
        fig, ax = plt.subplots(figsize=(6, 2))
        ax.axis("off")
        ax.text(0.5, 0.5, "no whole-split runs with an FP reference yet", ha="center", va="center")
        _save(fig, path)
        return
    models = sorted(frame.model.unique())
    colours = method_colours(sorted(frame.method.unique()))
    legend_rows = max(len(g.method.unique()) for _, g in frame.groupby(["model", "panel"]))
    row_height = 4.2 + 0.2 * legend_rows
    fig, axes = plt.subplots(len(models), 3, figsize=(19, row_height * len(models)), squeeze=False)
    names = {}  # axes -> its method-name labels, spread apart once the layout is final
    for row, model in enumerate(models):
        for panel, (title, xcol, xlabel) in enumerate(PANELS):
            ax = axes[row][panel]
            group = frame[(frame.model == model) & (frame.panel == panel)]
            if group.empty:
                ax.set_visible(False)
                continue
            if xcol == "setting":
                _draw_settings_panel(ax, group, colours)
            else:
                names[ax] = _draw_panel(ax, group, xcol, colours)
            ax.set_title(
                f"{model}: {title}\nFP PPL {group.fp_ppl.iloc[0]:.2f} (whole WikiText-2 test split); recipes only",
                fontsize=10,
            )
            ax.set_xlabel(xlabel, fontsize=9)
            ax.set_ylabel("PPL / FP PPL (log)", fontsize=9)
    fig.tight_layout(h_pad=2.0)
    for ax, labels in names.items():
        spread_labels(ax, labels)
    _save(fig, path)


def method_colours(methods: list[str]) -> dict[str, tuple]:
    """One colour per method (column) of the whole figure, so a method has the same colour in every panel, all
    distinct: tab10 up to ten methods, tab20 up to twenty, beyond that evenly spaced hues."""
    import matplotlib.pyplot as plt

    if len(methods) <= 20:
        cmap = plt.get_cmap("tab10" if len(methods) <= 10 else "tab20")
        return {m: cmap(i) for i, m in enumerate(methods)}
    cmap = plt.get_cmap("hsv")
    return {m: cmap(i / len(methods)) for i, m in enumerate(methods)}


def _draw_panel(ax, group, xcol: str, colours) -> list:
    """One panel against true bits: each method's runs (its Pareto-optimal ones filled and joined), collapsed
    runs as triangles on the ceiling with their PPL in the legend, bit settings named on the top axis. Returns
    the method-name labels (for `spread_labels`)."""
    labels = []
    for method, rows in sorted(group.groupby("method")):
        colour = colours[method]
        shown = rows[rows.rel <= CEILING]
        front = pareto_front(list(zip(shown[xcol], shown.rel, strict=True)))
        on_front = set(front)
        if len(front) > 1:
            ax.plot(*zip(*front, strict=True), color=colour, linewidth=1.2)
        for r in shown.itertuples():
            x = getattr(r, xcol)
            best = (x, r.rel) in on_front
            ax.scatter(x, r.rel, s=30, color=colour if best else "none", edgecolors=colour, zorder=3)
        down = rows[rows.rel > CEILING]
        ax.scatter(down[xcol], [CEILING] * len(down), marker="^", s=45, color=colour, zorder=3)
        if front:
            labels.append(_name_point(ax, method, front[0], colour))
        _legend_entry(ax, method, colour, down)
    settings = group.groupby("bits")[xcol].median().sort_values()
    top = ax.secondary_xaxis("top")
    top.set_xticks(list(settings), [_short_bits(b) for b in settings.index], fontsize=7, rotation=45, ha="left")
    _finish_axes(ax)
    return labels


def spread_labels(ax, labels: list) -> None:
    """Move labels up (in points, from the lowest anchor up) until no two overlap: methods whose runs land at
    the same true bits (AWQ, both GPTQs and RTN at W4 g64 all hold 4.31 b/w) keep a readable name each, in the
    order of their points' height. Call it after the layout is final: overlap is measured in display space."""
    renderer = ax.figure.canvas.get_renderer()
    pixels_per_point = ax.figure.dpi / 72
    placed = []
    for label in sorted(labels, key=lambda a: tuple(ax.transData.transform(a.xy))[::-1]):
        for _ in range(len(labels)):
            box = label.get_window_extent(renderer)
            hit = next((b for b in placed if box.overlaps(b)), None)
            if hit is None:
                break
            dx, dy = label.xyann
            label.xyann = (dx, dy + (hit.y1 - box.y0) / pixels_per_point + 1)
        placed.append(label.get_window_extent(renderer))


def setting_positions(group) -> tuple[list[str], dict[tuple[str, str], float]]:
    """Where the weight+activation/KV panel draws each run: the bit settings in order of (weight, activation,
    KV) bits, one slot each at 0, 1, 2, ...; inside a slot, the methods that ran that setting side by side in
    name order, evenly spread over 0.8 of the slot and centred on it. Returns (settings, {(bits, method): x})."""
    settings = sorted(
        group.bits.unique(), key=lambda b: (BitSpec.parse(b).w, BitSpec.parse(b).a, BitSpec.parse(b).kv, b)
    )
    positions: dict[tuple[str, str], float] = {}
    for slot, bits in enumerate(settings):
        methods = sorted(group[group.bits == bits].method.unique())
        width = 0.8 / len(methods)
        for j, method in enumerate(methods):
            positions[bits, method] = slot + (j - (len(methods) - 1) / 2) * width
    return settings, positions


def _draw_settings_panel(ax, group, colours) -> None:
    """The weight+activation/KV panel: these settings share ~4 bits per weight (W4A8KV8, W4A4KV4, W4A4KV16 …),
    so the x axis is the setting itself (`setting_positions`), each tick naming its true bits per weight; every
    seed and run drawn (seeds of one method share a spot), collapsed runs on the ceiling with PPL in the legend."""
    settings, positions = setting_positions(group)
    for method, rows in sorted(group.groupby("method")):
        colour = colours[method]
        xs = [positions[bits, method] for bits in rows.bits]
        ys = [min(rel, CEILING) for rel in rows.rel]
        markers = ["^" if rel > CEILING else "o" for rel in rows.rel]
        for x, y, marker in zip(xs, ys, markers, strict=True):
            ax.scatter(x, y, marker=marker, s=40 if marker == "o" else 45, color=colour, edgecolors="black",
                       linewidths=0.4, alpha=0.9, zorder=3)  # fmt: skip
            if marker == "o":
                _name_point(ax, method, (x, y), colour, rotation=90)
        _legend_entry(ax, method, colour, rows[rows.rel > CEILING])
    for slot in range(1, len(settings)):
        ax.axvline(slot - 0.5, color="0.75", linewidth=0.8)
    ticks = []
    for bits in settings:
        bpw = group[group.bits == bits].bpw
        span = f"{bpw.min():.2f}" if bpw.max() - bpw.min() < 0.005 else f"{bpw.min():.2f}–{bpw.max():.2f}"
        ticks.append(f"{bits}\n{span} b/w")
    ax.set_xticks(range(len(settings)), ticks, fontsize=8)
    ax.set_xlim(-0.5, len(settings) - 0.5)
    _finish_axes(ax, legend_y=-0.2)  # below the two-line tick labels and the axis label
    ax.grid(False, which="both", axis="x")  # the slot separators stand in for vertical grid lines


def _name_point(ax, method: str, point: tuple[float, float], colour, rotation: float = 0):
    """The method's name beside a point (the left end of its line, or each point of the settings panel), in
    its colour, so the eye need not go to the legend. Returns the annotation."""
    return ax.annotate(method, point, xytext=(5, 3), textcoords="offset points", fontsize=7, color=colour,
                rotation=rotation, ha="left", va="bottom", rotation_mode="anchor", zorder=4)  # fmt: skip


def _legend_entry(ax, method: str, colour, down) -> None:
    """The method's legend line, naming each of its collapsed runs' setting and PPL."""
    import textwrap

    label = method + "".join(
        f"; {_short_bits(r.bits)} collapsed: PPL {r.ppl:,.0f}" for r in down.sort_values("bpw").itertuples()
    )
    ax.scatter([], [], color=colour, label=textwrap.fill(label, 80))


def _finish_axes(ax, legend_y: float = -0.14) -> None:
    """The FP line at 1, log y up to the grey collapsed band, grid and the legend below the panel."""
    ax.axhline(1.0, color="black", linewidth=1, linestyle=":")
    ax.set_yscale("log")
    ax.set_ylim(0.9, CEILING * 1.6)
    ax.axhspan(CEILING, CEILING * 1.6, color="0.93", zorder=0)
    ax.text(0.01, 0.985, f"collapsed: > {CEILING:g}x FP (PPL in the legend)", transform=ax.transAxes, fontsize=7,
            va="top", color="0.35")  # fmt: skip
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, legend_y), fontsize=7, frameon=False, ncol=1)


def _short_bits(bits: str) -> str:
    """w4g128a16kv16 -> w4g128; w16a16kv3 -> kv3; w4a4kv4 stays."""
    spec = BitSpec.parse(bits)
    if spec.w >= 16:
        return f"kv{spec.kv:g}"
    if spec.a >= 16 and spec.kv >= 16:
        return bits.split("a")[0]
    return bits


def paretoq_points(records: list[dict], model: str = "smollm2-135m") -> list[tuple[str, float, float]]:
    """(bits, true bits/weight, PPL) of the finished whole-split ParetoQ recipe runs of `model`, plus its FP row."""
    frame = records_frame(records)
    frame = frame[(frame.status == "FINISHED") & frame.ppl.notna() & (frame.model == model)]
    frame = frame.loc[frame.p_ppl_max_windows.map(whole_split).astype(bool)]
    chosen = frame[frame.method.str.startswith("paretoq") & frame.recipe]  # ParetoQ's own quantizers
    fp = frame[(frame.bits == "w16a16kv16") & frame.method.str.startswith("rtn")]
    rows = [(r.bits, float(r.bpw), float(r.ppl)) for r in chosen.itertuples()]
    rows += [(r.bits, 16.0, float(r.ppl)) for r in fp.head(1).itertuples()]
    return sorted(rows, key=lambda row: row[1])


def plot_paretoq(records: list[dict], claims: dict, path: Path) -> bool:
    """`reports/paretoq.png`: WikiText-2 PPL against bits per weight — ours (SmolLM2-135M, the qat-cpu budget, true
    bits/weight incl. scales) beside the paper's MobileLLM-125M numbers (nominal bits). False if no ParetoQ run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ours = paretoq_points(records)
    if not any(bits != "w16a16kv16" for bits, _, _ in ours):
        return False
    paper = sorted((float(bits), float(ppl)) for bits, ppl in claims["wikitext2_ppl"].items())
    paper_fp = [ppl for bits, ppl in paper if bits >= 16]
    paper = [(bits, ppl) for bits, ppl in paper if bits < 16]
    ours_fp = [ppl for bits, _, ppl in ours if bits == "w16a16kv16"]
    ours = [row for row in ours if row[0] != "w16a16kv16"]
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.plot(
        [b for b, _ in paper],
        [p for _, p in paper],
        "s--",
        color="tab:gray",
        label=f"paper: {claims['model']} (far larger QAT budget)",
    )
    ax.plot(
        [b for _, b, _ in ours],
        [p for _, _, p in ours],
        "o-",
        color="tab:blue",
        label="ours: SmolLM2-135M, budget qat-cpu (131k training tokens at <= 2 bit)",
    )
    for fp, colour, who in ((paper_fp, "tab:gray", "paper"), (ours_fp, "tab:blue", "ours")):
        if fp:
            ax.axhline(fp[0], color=colour, linestyle=":", linewidth=1, label=f"{who}: 16-bit ({fp[0]:.1f})")
    for bits, bpw, ppl in ours:
        ax.annotate(bits.split("a")[0], (bpw, ppl), fontsize=8, xytext=(4, 4), textcoords="offset points")
    for bits, ppl in paper:
        ax.annotate(f"{bits:g}", (bits, ppl), fontsize=8, color="tab:gray", xytext=(4, -10), textcoords="offset points")
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (ours: true, incl. scales; paper: nominal)")
    ax.set_ylabel("WikiText-2 perplexity (log)")
    ax.set_title(f"{claims['paper']}: PPL vs bits, whole WikiText-2 test split")
    ax.grid(True, which="both", alpha=0.3)
    fig.legend(*ax.get_legend_handles_labels(), loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    _save(fig, path)
    return True


def loss_curve_runs(records: list[dict], method: str, model: str = "smollm2-135m") -> dict[str, list[dict]]:
    """{bits: the finished whole-split runs of `method` on `model` that kept their training loss per step}."""
    found: dict[str, list[dict]] = {}
    for rec in records:
        if (
            rec["method"] == method
            and rec["model"] == model
            and rec["status"] == "FINISHED"
            and rec.get("train_loss")
            and whole_split(rec["protocol"].get("ppl_max_windows"))
        ):
            found.setdefault(rec["bits"], []).append(rec)
    return dict(sorted(found.items(), key=lambda item: bits_order(item[0])))


def plot_training_loss(records: list[dict], method: str, path: Path, model: str = "smollm2-135m") -> bool:
    """`reports/loss/<method>.png`: the training loss per step of each of the method's whole-split runs that kept
    it, one panel per bit setting, one line per configuration (its label, budget and final PPL in the legend), so
    a diverging learning rate or an unfinished curve is seen next to the number it produced. False if none."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = loss_curve_runs(records, method, model)
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.6), squeeze=False)
    for ax, (bits, runs) in zip(axes[0], panels.items(), strict=True):
        for rec in sorted(runs, key=lambda r: r["metrics"].get("wikitext2_ppl", math.inf)):
            ppl = fmt(rec["metrics"].get("wikitext2_ppl"))
            recipe = " (recipe)" if is_recipe(rec) else ""
            label = f"{row_label(rec)} [{rec['protocol'].get('budget')}]{recipe}: PPL {ppl}"
            ax.plot(range(1, len(rec["train_loss"]) + 1), rec["train_loss"], linewidth=1.2, label=label)
        ax.set_title(f"{model} · {method} · {bits}", fontsize=10)
        _finish_loss_axes(ax)
    return _save_loss_figure(fig, path)


def claim_loss_pairs(records: list[dict], claims: dict, model: str = "smollm2-135m") -> list[tuple[str, dict, dict]]:
    """(claim text, its run, the run it is compared with) for each claim of one claims file whose two sides are
    both training runs that kept their loss per step: the runs the claim's verdict reads (the latest seed of each
    side's best configuration, as `reproduction.best_configuration` picks it)."""
    from harness.reproduction import best_configuration

    pairs = []
    for claim in claims.get("claims", []):
        other = claim.get("below", claim.get("near"))
        if other is None:
            continue
        runs, _ = best_configuration(records, model, claim["run"])
        others, _ = best_configuration(records, model, other)
        if runs and others and runs[-1].get("train_loss") and others[-1].get("train_loss"):
            pairs.append((claim["text"], runs[-1], others[-1]))
    return pairs


def plot_claim_losses(records: list[dict], claims: dict, path: Path, model: str = "smollm2-135m") -> bool:
    """`reports/loss/claims-<file>.png`: per claim that compares two training runs, both runs' training loss per
    step on one panel (the claim's run solid, the one it is compared with dashed, final PPL in the legend), so a
    claim about convergence or stability (R2Q's) is read off the curves of the very runs its verdict reads."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = claim_loss_pairs(records, claims, model)
    if not pairs:
        return False
    fig, axes = plt.subplots(1, len(pairs), figsize=(6.5 * len(pairs), 4.8), squeeze=False)
    for ax, (text, run, other) in zip(axes[0], pairs, strict=True):
        for rec, style in ((run, "-"), (other, "--")):
            ppl = fmt(rec["metrics"].get("wikitext2_ppl"))
            label = textwrap.fill(f"{row_label(rec)} {rec['bits']} [{rec['protocol'].get('budget')}]: PPL {ppl}", 75)
            ax.plot(range(1, len(rec["train_loss"]) + 1), rec["train_loss"], style, linewidth=1.2, label=label)
        ax.set_title(f"{model}: {text}", fontsize=9, wrap=True)
        _finish_loss_axes(ax)
    return _save_loss_figure(fig, path)


def _finish_loss_axes(ax) -> None:
    """Axis labels, grid and the legend below a training-loss panel."""
    ax.set_xlabel("training step", fontsize=9)
    ax.set_ylabel("training loss (the method's objective)", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), fontsize=7, frameon=False)


def _save_loss_figure(fig, path: Path) -> bool:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    _save(fig, path)
    return True


def _save(fig, path: Path) -> None:
    """PNG written atomically (a full disk leaves the previous plot), then the figure closed."""
    import matplotlib.pyplot as plt

    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, metadata={"Software": None}))
    finally:
        plt.close(fig)
