"""PNG plots from metrics lines (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

PHASE_COLORS = {"central": "#f4d35e", "federated": "#9ad1d4"}


class _Figures:
    """``subplots`` on matplotlib's object API (Figure + the Agg canvas), not pyplot: no global
    figure registry to close, no GUI backend selection, and about a second less to import."""

    @staticmethod
    def subplots(nrows: int = 1, ncols: int = 1, figsize: Any = None) -> tuple[Any, Any]:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=figsize)
        FigureCanvasAgg(fig)
        return fig, fig.subplots(nrows, ncols)


def _pyplot() -> _Figures:
    return _Figures()


def metric_key(lines: Sequence[dict[str, Any]]) -> str:
    """accuracy for classification runs, perplexity for language-model runs."""
    return "perplexity" if any(r.get("perplexity") is not None for r in lines) else "accuracy"


def shade_phases(ax: Any, lines: Sequence[dict[str, Any]], x_of: Any = None) -> None:
    """Shade each central stage (and leave federated ones clear) so the timeline shows on the plot."""
    x_of = x_of or (lambda r: r["round"])
    prev_x = 0.0
    for r in lines:
        if r["round"] == 0:
            prev_x = x_of(r)
            continue
        x = x_of(r)
        if r.get("phase") == "central":
            ax.axvspan(prev_x, x, color=PHASE_COLORS["central"], alpha=0.35, lw=0)
        prev_x = x


def plot_runs(runs: Sequence[tuple[str, list[dict[str, Any]]]], path: Path) -> Path:
    """Test metric and loss per stage, one line per run; central stages shaded."""
    plt = _pyplot()
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 4))
    key = metric_key([r for _, lines in runs for r in lines])
    for label, lines in runs:
        ev = [r for r in lines if r.get(key) is not None]
        ax_acc.plot([r["round"] for r in ev], [r[key] for r in ev], marker="o", label=label)
        ax_loss.plot([r["round"] for r in ev], [r["loss"] for r in ev], marker="o", label=f"{label} test")
        tr = [r for r in lines if r.get("train_loss") is not None]
        ax_loss.plot([r["round"] for r in tr], [r["train_loss"] for r in tr], linestyle="--", label=f"{label} train")
    if len(runs) == 1:
        shade_phases(ax_acc, runs[0][1])
        shade_phases(ax_loss, runs[0][1])
    ax_acc.set(xlabel="stage (round)", ylabel=f"test {key}", title=key.capitalize())
    ax_loss.set(xlabel="stage (round)", ylabel="cross-entropy", title="Loss")
    _finish(fig, (ax_acc, ax_loss), path)
    return path


def plot_paradigms(runs: dict[str, list[list[dict[str, Any]]]], out: Path) -> list[Path]:
    """Compare paradigms: metric vs stage and vs cumulative bytes (mean over seeds, band = min..max),
    with the first FFM seed's central stages shaded."""
    plt = _pyplot()
    key = metric_key([r for seeds in runs.values() for lines in seeds for r in lines])
    paths = []
    for xname, x_of in (("stage", lambda r, c: r["round"]), ("MB", lambda r, c: c / 1e6)):
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for paradigm, seeds in runs.items():
            xs, ys = _mean_curve(seeds, key, x_of)
            if len(xs):
                ax.plot(xs, ys.mean(0), marker="o", ms=3, label=paradigm)
                ax.fill_between(xs, ys.min(0), ys.max(0), alpha=0.15)
        if xname == "stage" and runs.get("ffm"):
            shade_phases(ax, runs["ffm"][0])
        ax.set(xlabel="stage (central stage or federated round)" if xname == "stage" else "MB communicated (cumulative)",
               ylabel=f"test {key}", title=f"{key} vs {xname}" + (" (shaded: central stages of FFM seed 0)" if xname == "stage" else ""))
        path = out / f"{key}_vs_{xname.lower()}.png"
        _finish(fig, (ax,), path)
        paths.append(path)
    return paths


def _mean_curve(seeds: list[list[dict[str, Any]]], key: str, x_of: Any) -> tuple[np.ndarray, np.ndarray]:
    """x from the first seed (all seeds share a paradigm's stage structure up to noise), y stacked."""
    curves = []
    for lines in seeds:
        cum, pts = 0.0, []
        for r in lines:
            cum += (r.get("bytes_up") or 0) + (r.get("bytes_down") or 0)
            if r.get(key) is not None:
                pts.append((x_of(r, cum), r[key]))
        curves.append(pts)
    n = min(len(c) for c in curves) if curves else 0
    if n == 0:
        return np.zeros(0), np.zeros((0, 0))
    xs = np.array([p[0] for p in curves[0][:n]])
    ys = np.array([[p[1] for p in c[:n]] for c in curves])
    return xs, ys


def _finish(fig: Any, axes: Sequence[Any], path: Path) -> None:
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
