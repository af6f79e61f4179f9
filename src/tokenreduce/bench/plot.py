"""Pareto plots: quality against cost, one line with markers per method, the reference as a star.

Generic over rows (``dict``) and keys, so every benchmark draws the same picture: give the
quality key (``y``) and one panel per cost key (analytic FLOPs, measured time, cache bytes).
Draws on a bare ``matplotlib.figure.Figure`` (Agg canvas): no display needed, pyplot untouched.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

__all__ = ["Panel", "pareto_plot"]


@dataclass(frozen=True)
class Panel:
    x: str  # row key on the x axis (a cost)
    xlabel: str | None = None
    log_x: bool = False


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")


def pareto_plot(rows: Sequence[dict], path: str | Path, y: str, panels: Sequence[Panel], ylabel: str | None = None,
                group: str = "method", is_reference: Callable[[dict], bool] | None = None,
                label: Callable[[dict], str] | None = None, title: str | None = None,
                annotate: str | None = None, dpi: int = 120) -> Path:
    """Write a PNG with one panel per cost in ``panels``, ``y`` against it.

    Rows where ``is_reference(row)`` holds (the unreduced model) are drawn as a black star;
    the others are grouped by ``row[group]``, sorted by x and joined. ``annotate`` names a
    row key printed next to each point (e.g. the budget). A panel without any finite
    value says so instead of failing (e.g. timing was skipped).
    """
    import matplotlib
    from matplotlib.figure import Figure  # no pyplot: leaves the caller's backend and figures alone

    if not panels:
        raise ValueError("pareto_plot needs at least one panel")
    is_reference = is_reference or (lambda r: False)
    label = label or (lambda r: str(r.get(group)))
    refs = [r for r in rows if is_reference(r)]
    groups: dict[str, list[dict]] = {}
    for r in rows:
        if not is_reference(r):
            groups.setdefault(label(r), []).append(r)

    fig = Figure(figsize=(5.2 * len(panels), 4.2))
    axes = fig.subplots(1, len(panels), squeeze=False)
    cmap = matplotlib.colormaps["tab10" if len(groups) <= 10 else "tab20"]
    markers = "osD^v<>pXh*"
    for ax, panel in zip(axes[0], panels):
        drawn = 0
        for i, (name, members) in enumerate(groups.items()):
            pts = sorted(((r[panel.x], r[y], r) for r in members if _finite(r.get(panel.x)) and _finite(r.get(y))),
                         key=lambda t: t[0])
            if not pts:
                continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=markers[i % len(markers)], color=cmap(i % cmap.N),
                    label=name, linewidth=1.4, markersize=6)
            if annotate:
                for px, py, r in pts:
                    if r.get(annotate) is not None:
                        ax.annotate(f"{r[annotate]}", (px, py), textcoords="offset points", xytext=(4, 4), fontsize=7,
                                    color=cmap(i % cmap.N))
            drawn += len(pts)
        for r in refs:
            if _finite(r.get(panel.x)) and _finite(r.get(y)):
                ax.plot([r[panel.x]], [r[y]], marker="*", color="black", markersize=15, linestyle="none",
                        label=label(r) if r is refs[0] else None, zorder=5)
                drawn += 1
        if not drawn:
            ax.text(0.5, 0.5, f"no data for {panel.x}", ha="center", va="center", transform=ax.transAxes)
        if panel.log_x and drawn:
            ax.set_xscale("log")
        ax.set_xlabel(panel.xlabel or panel.x)
        ax.set_ylabel(ylabel or y)
        ax.grid(True, alpha=0.3)
        if drawn:
            ax.legend(fontsize=8, loc="best")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)  # a bare Figure renders with the Agg canvas
    return path
