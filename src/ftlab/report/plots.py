"""The report's plots: pure functions from plain rows to a matplotlib ``Figure`` (Agg canvas, no pyplot state).

- ``pareto_figure``: target gain against retained ratio, one point per arm, the Pareto front as a step line;
- ``heatmap_figure``: the accuracy matrix of a continual run, one panel per trained arm;
- ``suite_bars_figure``: score per arm, one panel per suite;
- ``figure_png``: a figure as PNG bytes.
"""

from __future__ import annotations

import io
import math

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ftlab.report.summary import Point

_KIND_STYLE = {"train": ("tab:blue", "o"), "edit": ("tab:orange", "D"), "base": ("black", "*")}


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)  # attach the Agg canvas so savefig never touches a GUI backend
    return fig


def figure_png(fig: Figure) -> bytes:
    """Render a figure to PNG bytes.

    Args:
        fig: the figure.

    Returns:
        The PNG file's bytes.
    """
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def pareto_figure(
    points: list[Point],
    front: list[bool],
    x_label: str = "retention",
    paths: dict[str, list[str]] | None = None,
    recommended: list[str] | None = None,
) -> Figure:
    """Target gain (y) against retained ratio (x) with the Pareto front drawn and the base model at (1, 0).

    Args:
        points: the arms to place; each needs ``gain`` and ``retention``.
        front: one flag per point, True for points on the Pareto front.
        x_label: the x axis label.
        paths: arm -> the points a forgetting-budget search visited, in order (drawn as a numbered dotted line).
        recommended: the points the searches chose (ringed in green).

    Returns:
        The figure.
    """
    fig = _figure(7.0, 5.0)
    ax = fig.add_subplot()
    ax.axvline(1.0, color="0.75", lw=0.8, ls="--")
    ax.axhline(0.0, color="0.75", lw=0.8, ls="--")
    ax.scatter([1.0], [0.0], marker="*", s=160, color="black", zorder=3, label="base model")
    by_arm = {p.arm: p for p in points}
    for p in points:  # a thin line from each repair point back to the fine-tune it was derived from
        parent = by_arm.get(p.parent or "")
        if p.kind == "edit" and parent is not None:
            ax.plot([parent.retention, p.retention], [parent.gain, p.gain], color="0.8", lw=0.8, zorder=1)
    for kind in ("train", "edit"):
        sel = [p for p in points if p.kind == kind]
        if sel:
            color, marker = _KIND_STYLE[kind]
            label = "trained arm" if kind == "train" else "repair point"
            ax.scatter([p.retention for p in sel], [p.gain for p in sel], color=color, marker=marker, s=40,
                       zorder=3, label=label)  # fmt: skip
    for p in points:
        ax.annotate(p.arm, (p.retention, p.gain), xytext=(4, 4), textcoords="offset points", fontsize=8)
    on_front = sorted(((p.retention, p.gain) for p, f in zip(points, front, strict=True) if f), key=lambda xy: xy[0])
    if on_front:
        xs, ys = zip(*on_front, strict=True)
        ax.step(xs, ys, where="post", color="tab:red", lw=1.5, zorder=2, label="Pareto front")
        ax.scatter(xs, ys, facecolors="none", edgecolors="tab:red", s=140, zorder=2)
    _search_paths(ax, by_arm, paths or {}, recommended or [])
    ax.set_xlabel(f"{x_label} (1.0 = unchanged; right is better)")
    ax.set_ylabel("target gain over base (up is better)")
    ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def _search_paths(ax, by_arm: dict[str, Point], paths: dict[str, list[str]], recommended: list[str]) -> None:
    """The budget searches' paths (``ftlab.budget``): a dotted line through the visited points in order, each
    numbered, and a green ring on each chosen point."""
    labelled = False
    for names in paths.values():
        seq = [by_arm[n] for n in names if n in by_arm]
        if not seq:
            continue
        ax.plot([p.retention for p in seq], [p.gain for p in seq], color="tab:green", lw=1.0, ls=":", zorder=2,
                label=None if labelled else "budget search path")  # fmt: skip
        labelled = True
        for i, p in enumerate(seq, 1):
            ax.annotate(str(i), (p.retention, p.gain), xytext=(-10, -10), textcoords="offset points", fontsize=7,
                        color="tab:green")  # fmt: skip
    chosen = [by_arm[n] for n in recommended if n in by_arm]
    if chosen:
        ax.scatter([p.retention for p in chosen], [p.gain for p in chosen], facecolors="none", edgecolors="tab:green",
                   s=260, linewidths=2, zorder=4, label="recommended (keeps the budget)")  # fmt: skip


def heatmap_figure(
    matrices: dict[str, list[list[float | None]]], row_labels: list[str], col_labels: list[str]
) -> Figure:
    """The accuracy matrix R (rows = after stage 0..T, columns = target suites), one panel per arm.

    Args:
        matrices: arm -> R, rows 0..T; ``None`` marks a missing score.
        row_labels: one label per row.
        col_labels: one label per column.

    Returns:
        The figure, with every cell annotated with its value and one colour scale shared by all panels (0..1 when
        every score lies in it).
    """
    n = max(len(matrices), 1)
    fig = _figure(max(3.0, 1.0 + 1.1 * len(col_labels)) * n + 1.5, 0.8 + 0.55 * len(row_labels))
    axes = fig.subplots(1, n, squeeze=False)[0]
    values = [v for R in matrices.values() for row in R for v in row if v is not None]
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    if 0.0 <= lo and hi <= 1.0:  # accuracies: a fixed 0..1 scale reads the same in every report
        lo, hi = 0.0, 1.0
    elif hi == lo:
        lo, hi = lo - 0.5, hi + 0.5
    image = None
    for ax, (arm, R) in zip(axes, matrices.items(), strict=True):
        grid = [[math.nan if v is None else v for v in row] for row in R]
        image = ax.imshow(grid, cmap="viridis", vmin=lo, vmax=hi, aspect="auto")
        for i, row in enumerate(R):
            for j, v in enumerate(row):
                text = "-" if v is None else f"{v:.2f}"
                shade = "white" if v is None or v < (lo + hi) / 2 else "black"
                ax.text(j, i, text, ha="center", va="center", fontsize=8, color=shade)
        ax.set_title(arm, fontsize=10)
        ax.set_xticks(range(len(col_labels)), col_labels, rotation=30, ha="right", fontsize=8)
        ax.set_yticks(range(len(row_labels)), row_labels if ax is axes[0] else [""] * len(row_labels), fontsize=8)
    if image is not None:
        fig.colorbar(image, ax=list(axes), shrink=0.8, label="score")
    return fig


def suite_bars_figure(
    scores: dict[str, dict[str, tuple[float, float]]], arms: list[str], lower_is_better: set[str] | None = None
) -> Figure:
    """Score per arm, one panel per suite (suites can have different scales, e.g. perplexity).

    Args:
        scores: suite -> arm -> (score, stderr); arms missing from a suite get no bar.
        arms: the arms in display order (one colour each, the same in every panel).
        lower_is_better: suites whose panel title should say so (e.g. perplexity).

    Returns:
        The figure.
    """
    suites = list(scores)
    cols = min(3, max(len(suites), 1))
    rows = max(1, math.ceil(len(suites) / cols))
    fig = _figure(4.2 * cols, 0.6 + (1.0 + 0.22 * len(arms)) * rows)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    colors = {a: f"C{i % 10}" for i, a in enumerate(arms)}
    for ax, suite in zip(axes[: len(suites)], suites, strict=True):
        present = [a for a in arms if a in scores[suite]]
        vals = [scores[suite][a][0] for a in present]
        errs = [scores[suite][a][1] or 0.0 for a in present]
        ax.barh(range(len(present)), vals, xerr=errs, color=[colors[a] for a in present], capsize=2)
        ax.set_yticks(range(len(present)), present, fontsize=8)
        ax.invert_yaxis()  # base (first arm) on top
        ax.set_title(f"{suite} (lower is better)" if suite in (lower_is_better or set()) else suite, fontsize=10)
        ax.tick_params(axis="x", labelsize=8)
        ax.grid(axis="x", alpha=0.3)
    for ax in axes[len(suites) :]:
        ax.set_visible(False)
    return fig
