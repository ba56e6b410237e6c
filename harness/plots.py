"""`reports/pareto.png` (PPL relative to FP against true bits, per model and kind of setting) and
`reports/paretoq.png` (ParetoQ's size-vs-quality curve beside the paper's)."""

from __future__ import annotations

import math
from pathlib import Path

from harness.report import _frame, _whole_split
from methods.core.atomic import atomic_write
from methods.core.bits import BitSpec

CEILING = 10.0  # PPL relative to FP above which a run counts as collapsed and is drawn on the ceiling
PANELS = (
    ("weights only (a16 kv16)", "bpw", "true bits per weight (quantized linears, incl. scales)"),
    ("weights + activations and/or KV cache", "bpw", "true bits per weight (quantized linears, incl. scales)"),
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
    """Whole-split finished runs with their panel, PPL relative to the model's FP run and KV bits per element;
    None when no model has an FP run on the whole split."""
    frame = _frame(records)
    frame = frame[(frame.status == "FINISHED") & frame.ppl.notna() & frame.bpw.notna()]
    frame = frame.loc[frame.p_ppl_max_windows.map(_whole_split).astype(bool)].copy()
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
    """PPL relative to FP against true bits, whole test split only (budget subsets stay in the tables): one row
    per model, panels for weight-only, weight+activation/KV and KV-only settings; one colour per method, a line
    through its Pareto-optimal points (dominated runs hollow); runs above CEILING x FP drawn on the ceiling with
    their PPL; the FP line at 1."""
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
    methods = sorted(frame.method.unique())
    cmap = plt.get_cmap("tab10" if len(methods) <= 10 else "tab20")
    colours = {m: cmap(i % cmap.N) for i, m in enumerate(methods)}
    legend_rows = max(len(g.method.unique()) for _, g in frame.groupby(["model", "panel"]))
    row_height = 4.2 + 0.2 * legend_rows
    fig, axes = plt.subplots(len(models), 3, figsize=(19, row_height * len(models)), squeeze=False)
    labels: dict = {}
    for row, model in enumerate(models):
        for panel, (title, xcol, xlabel) in enumerate(PANELS):
            ax = axes[row][panel]
            group = frame[(frame.model == model) & (frame.panel == panel)]
            if group.empty:
                ax.set_visible(False)
                continue
            labels[ax] = _draw_panel(ax, group, xcol, colours, annotate=panel == 1)
            ax.set_title(
                f"{model}: {title}\nFP PPL {group.fp_ppl.iloc[0]:.2f} (whole WikiText-2 test split)", fontsize=10
            )
            ax.set_xlabel(xlabel, fontsize=9)
            ax.set_ylabel("PPL / FP PPL (log)", fontsize=9)
    fig.tight_layout(h_pad=2.0)
    for ax, pending in labels.items():
        _place_labels(ax, pending)
    _save(fig, path)


def spread_labels(wanted: list[float], gap: float, low: float = 0.0, high: float = 1.0) -> list[float]:
    """Label positions on one axis (axes fraction) at least `gap` apart, in the order of `wanted`, inside
    [low, high], each as close to where it is wanted as the others allow (least squares: overlapping labels
    are merged into blocks centred on their members' mean, pool-adjacent-violators style)."""
    order = sorted(range(len(wanted)), key=lambda i: wanted[i])
    n = len(order)
    if n == 0:
        return []
    gap = min(gap, (high - low) / max(n - 1, 1))
    # the i-th label of a block sits at block start + i * gap; clip so every label fits inside [low, high]
    starts = [min(max(wanted[i], low + k * gap), high - (n - 1 - k) * gap) - k * gap for k, i in enumerate(order)]
    blocks: list[list[float]] = []  # [sum of member starts, member count]
    for start in starts:
        blocks.append([start, 1])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] >= blocks[-1][0] / blocks[-1][1]:
            total, count = blocks.pop()
            blocks[-1][0] += total
            blocks[-1][1] += count
    placed = [0.0] * n
    k = 0
    for total, count in blocks:
        for _ in range(count):
            placed[order[k]] = total / count + k * gap
            k += 1
    return placed


def _place_labels(ax, pending: list[tuple[float, float, str, tuple]]) -> None:
    """Each pending (x, y, text, colour) label beside its point with a leader line: labels of points whose x lie
    close (W4A8 and W4A4 settings share ~4 bits/weight) stacked left of them, spread apart vertically."""
    if not pending:
        return
    from matplotlib.transforms import blended_transform_factory, offset_copy

    fontsize = 7
    ymin, ymax = (float(v) for v in ax.get_ylim())
    xmin, xmax = (float(v) for v in ax.get_xlim())

    def frac(y: float) -> float:
        return (math.log(y) - math.log(ymin)) / (math.log(ymax) - math.log(ymin))

    height_pt = ax.get_window_extent().height * 72 / ax.figure.dpi
    gap = 1.3 * fontsize / height_pt
    clusters: list[list[int]] = []
    for i in sorted(range(len(pending)), key=lambda i: pending[i][0]):
        if clusters and pending[i][0] - pending[clusters[-1][-1]][0] < 0.08 * (xmax - xmin):
            clusters[-1].append(i)
        else:
            clusters.append([i])
    frame = blended_transform_factory(ax.transData, ax.transAxes)
    for members in clusters:
        xs = [pending[i][0] for i in members]
        # a stack of labels goes left of its points (open space below 4 bits), so do labels near the right edge
        left = len(members) > 1 or max(xs) > xmin + 0.85 * (xmax - xmin)
        anchor_x = min(xs) if left else max(xs)
        text_at = offset_copy(frame, fig=ax.figure, x=-12 if left else 12, units="points")
        ys = spread_labels([frac(pending[i][1]) for i in members], gap, low=0.02, high=0.98)
        for i, y in zip(members, ys, strict=True):
            x, value, text, colour = pending[i]
            ink = tuple(0.65 * c for c in colour[:3])  # darker than the marker: light tab20 colours stay legible
            leader = {"arrowstyle": "-", "color": colour, "linewidth": 0.5, "shrinkA": 0, "shrinkB": 2}
            ax.annotate(text, (x, value), xytext=(anchor_x, y), textcoords=text_at, fontsize=fontsize, color=ink,
                        va="center", ha="right" if left else "left", arrowprops=leader)  # fmt: skip


def _draw_panel(ax, group, xcol: str, colours, annotate: bool) -> list[tuple[float, float, str, tuple]]:
    """One panel: each method's runs (its Pareto-optimal ones filled and joined), collapsed runs as triangles
    on the ceiling with their PPL in the legend, bit settings named on the top axis — or, where settings share
    an x (`annotate`: W4A8 and W4A4 have the same bits per weight), next to every point (the labels returned for
    `_place_labels` once the layout is final), with one front per activation/KV setting."""
    import textwrap

    ax.axhline(1.0, color="black", linewidth=1, linestyle=":")
    labels = []
    for method, rows in sorted(group.groupby("method")):
        colour = colours[method]
        shown = rows[rows.rel <= CEILING]
        # settings that differ in what the x axis does not show (activation/KV bits) get fronts of their own
        kind = shown.bits.map(lambda b: f"a{BitSpec.parse(b).a}kv{BitSpec.parse(b).kv}" if annotate else "all")
        on_front: set = set()
        for _, same in shown.groupby(kind):
            front = pareto_front(list(zip(same[xcol], same.rel, strict=True)))
            on_front |= set(front)
            if len(front) > 1:
                ax.plot(*zip(*front, strict=True), color=colour, linewidth=1.2)
        for r in shown.itertuples():
            x, best = getattr(r, xcol), (getattr(r, xcol), r.rel) in on_front
            ax.scatter(x, r.rel, s=30, color=colour if best else "none", edgecolors=colour, zorder=3)
            if annotate:
                labels.append((float(x), float(r.rel), _short_bits(r.bits), colour))
        down = rows[rows.rel > CEILING].sort_values(xcol)
        ax.scatter(down[xcol], [CEILING] * len(down), marker="^", s=45, color=colour, zorder=3)
        label = method + ("".join(f"; {_short_bits(r.bits)} collapsed: PPL {r.ppl:,.0f}" for r in down.itertuples()))
        ax.scatter([], [], color=colour, label=textwrap.fill(label, 80))
    if not annotate:
        settings = group.groupby("bits")[xcol].median().sort_values()
        top = ax.secondary_xaxis("top")
        top.set_xticks(list(settings), [_short_bits(b) for b in settings.index], fontsize=7, rotation=45, ha="left")
    ax.set_yscale("log")
    ax.set_ylim(0.9, CEILING * 1.6)
    ax.axhspan(CEILING, CEILING * 1.6, color="0.93", zorder=0)
    ax.text(0.01, 0.985, f"collapsed: > {CEILING:g}x FP (PPL in the legend)", transform=ax.transAxes, fontsize=7,
            va="top", color="0.35")  # fmt: skip
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), fontsize=7, frameon=False, ncol=1)
    return labels


def _short_bits(bits: str) -> str:
    """w4g128a16kv16 -> w4g128; w16a16kv3 -> kv3; w4a4kv4 stays."""
    spec = BitSpec.parse(bits)
    if spec.w >= 16:
        return f"kv{spec.kv:g}"
    if spec.a >= 16 and spec.kv >= 16:
        return bits.split("a")[0]
    return bits


def paretoq_points(records: list[dict], model: str = "smollm2-135m") -> list[tuple[str, float, float]]:
    """(bits, true bits/weight, PPL) of the finished whole-split ParetoQ runs of `model`, plus its FP row."""
    frame = _frame(records)
    frame = frame[(frame.status == "FINISHED") & frame.ppl.notna() & (frame.model == model)]
    frame = frame.loc[frame.p_ppl_max_windows.map(_whole_split).astype(bool)]
    chosen = frame[frame.method.str.startswith("paretoq")]
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


def _save(fig, path: Path) -> None:
    """PNG written atomically (a full disk leaves the previous plot), then the figure closed."""
    import matplotlib.pyplot as plt

    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, metadata={"Software": None}))
    finally:
        plt.close(fig)
