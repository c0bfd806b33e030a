"""Comparison tables (markdown, CSV, rich) of run directories."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Optional, Sequence

from fedfm.errors import FedfmError
from fedfm.report.metrics import read_lines

COLUMNS = ("run", "rounds", "accuracy", "best_accuracy", "f1", "perplexity", "loss", "MB_up", "MB_down", "wall_s")


def run_row(run_dir: Path) -> dict[str, Any]:
    """One row of metrics for a run, from metrics.jsonl (works for unfinished runs too)."""
    from fedfm.runner import summarize

    lines = read_lines(run_dir / "metrics.jsonl")
    if not lines:
        raise FedfmError(f"{str(run_dir)!r} holds no metrics.jsonl: not a fedfm run directory, or it never started")
    s = summarize(lines)
    return {
        "run": run_dir.name, "rounds": s["rounds"], "accuracy": s["accuracy"], "best_accuracy": s["best_accuracy"],
        "f1": s["f1"], "perplexity": s["perplexity"], "loss": s["loss"], "MB_up": s["bytes_up"] / 1e6, "MB_down": s["bytes_down"] / 1e6,
        "wall_s": s["wall_s"],
    }


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def to_markdown(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_fmt(r[c]) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def to_csv(rows: Sequence[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(COLUMNS))
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def build_report(run_dirs: Sequence[Path], out: Optional[Path]) -> tuple[Any, list[Path]]:
    """(rich table, written files): report.md, report.csv and report.png in ``out``
    (default: the run directory itself for one run, ./runs/report for several)."""
    from rich.table import Table

    from fedfm.report.plots import plot_runs

    rows = [run_row(d) for d in run_dirs]
    out = out or (run_dirs[0] if len(run_dirs) == 1 else Path("runs") / "report")
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(to_markdown(rows), encoding="utf-8")
    (out / "report.csv").write_text(to_csv(rows), encoding="utf-8")
    plot = plot_runs([(d.name, read_lines(d / "metrics.jsonl")) for d in run_dirs], out / "report.png")
    table = Table(*COLUMNS)
    for r in rows:
        table.add_row(*(_fmt(r[c]) for c in COLUMNS))
    return table, [out / "report.md", out / "report.csv", plot]
