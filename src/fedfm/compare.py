"""`fedfm compare`: the training paradigms on the same data, seeds and compute budget.

Paradigms (see ExperimentConfig.paradigm): ``central`` (server, public data only),
``fl`` (clients, private data only), ``ffm`` (the configured schedule of both), and
``pooled`` (all data centralized: an upper bound no deployment can have).

Every paradigm gets the same compute budget in training examples processed: the
config's ``schedule.budget_compute`` if set, else what plain FL spends in
``federation.rounds`` rounds. Each (paradigm, seed) run is an ordinary run directory;
a compare interrupted midway resumes: finished runs are kept, unfinished ones resumed.
"""

from __future__ import annotations

import csv
import io
import json
import statistics
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from fedfm.config import ExperimentConfig
from fedfm.report.metrics import read_lines

PARADIGMS = ("central", "fl", "ffm", "pooled")


def fl_compute(cfg: ExperimentConfig) -> float:
    """Training examples plain FL processes in federation.rounds rounds (an upper bound when
    clients hold fewer examples than max_steps x batch_size)."""
    c = cfg.client
    if c.max_steps is None:
        raise ValueError("compare needs client.max_steps (or schedule.budget_compute) to fix the compute budget")
    return float(cfg.federation.rounds * cfg.federation.clients_per_round * c.max_steps * c.batch_size)


def paradigm_config(cfg: ExperimentConfig, paradigm: str, seed: int, budget: float) -> ExperimentConfig:
    schedule = cfg.schedule.model_copy(update={"budget_compute": budget})
    return cfg.model_copy(update={"paradigm": paradigm, "seed": seed, "schedule": schedule})


def run_compare(
    cfg: ExperimentConfig,
    seeds: Sequence[int],
    out: Path,
    paradigms: Sequence[str] = PARADIGMS,
    run_one: Optional[Callable[[ExperimentConfig, Path], Any]] = None,
    callbacks: Optional[Any] = None,
) -> list[dict[str, Any]]:
    """Run every (paradigm, seed) into ``out/<paradigm>/seed<k>`` and write the table and plots.

    Returns:
        One summary row per paradigm (mean and std over seeds).
    """
    from fedfm import runner

    budget = cfg.schedule.budget_compute or fl_compute(cfg)
    run_one = run_one or (lambda c, d: _run_or_resume(c, d, runner, callbacks))
    for paradigm in paradigms:
        for seed in seeds:
            run_one(paradigm_config(cfg, paradigm, seed, budget), out / paradigm / f"seed{seed}")
    rows = [aggregate_row(p, [out / p / f"seed{s}" for s in seeds]) for p in paradigms]
    write_tables(rows, out)
    plot_compare(out, paradigms, seeds)
    return rows


def _run_or_resume(cfg: ExperimentConfig, run_dir: Path, runner: Any, callbacks: Any = None) -> None:
    """Skip a finished run, resume an interrupted one, start a new one."""
    if (run_dir / "summary.json").is_file():
        return
    if (run_dir / "config.toml").is_file():
        runner.resume(run_dir, callbacks)
    else:
        runner.run(cfg, run_dir, callbacks)


def aggregate_row(paradigm: str, run_dirs: Sequence[Path]) -> dict[str, Any]:
    """Mean and sample std over seeds of the final metrics of each run."""
    summaries = [json.loads((d / "summary.json").read_text()) for d in run_dirs]
    row: dict[str, Any] = {"paradigm": paradigm, "seeds": len(summaries)}
    for key in ("accuracy", "f1", "perplexity", "loss"):
        row.update(_mean_std(key, [s[key] for s in summaries if s.get(key) is not None]))
    row.update(_mean_std("MB", [(s["bytes_up"] + s["bytes_down"]) / 1e6 for s in summaries]))
    row.update(_mean_std("wall_s", [s["wall_s"] for s in summaries]))
    row["stages"] = statistics.mean(s["rounds"] for s in summaries)
    return row


def _mean_std(key: str, values: list[float]) -> dict[str, Optional[float]]:
    if not values:
        return {f"{key}_mean": None, f"{key}_std": None}
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {f"{key}_mean": statistics.mean(values), f"{key}_std": std}


COLUMNS = ("accuracy", "f1", "perplexity", "loss", "MB", "wall_s")


def write_tables(rows: Sequence[dict[str, Any]], out: Path) -> None:
    """table.md and table.csv; metric columns no run has (perplexity of a classifier) are left out."""
    out.mkdir(parents=True, exist_ok=True)
    columns = [c for c in COLUMNS if any(r[f"{c}_mean"] is not None for r in rows)]
    header = ["paradigm", "seeds", "stages"] + [f"{c} (mean +/- std)" for c in columns]
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r["paradigm"], str(r["seeds"]), f"{r['stages']:.1f}"] + [_pm(r, c) for c in columns]
        md.append("| " + " | ".join(cells) + " |")
    (out / "table.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    buf = io.StringIO()
    fields = ["paradigm", "seeds", "stages"] + [f"{c}_{s}" for c in columns for s in ("mean", "std")]
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    (out / "table.csv").write_text(buf.getvalue(), encoding="utf-8")


def _pm(row: dict[str, Any], key: str) -> str:
    m, s = row[f"{key}_mean"], row[f"{key}_std"]
    if m is None:
        return "-"
    digits = 4 if abs(m) < 10 else 1
    return f"{m:.{digits}f} +/- {s:.{digits}f}"


def plot_compare(out: Path, paradigms: Sequence[str], seeds: Sequence[int]) -> list[Path]:
    """Test metric vs stage and vs cumulative bytes, one line per paradigm (mean over seeds),
    with the FFM run's central stages shaded."""
    from fedfm.report.plots import plot_paradigms

    runs = {p: [read_lines(out / p / f"seed{s}" / "metrics.jsonl") for s in seeds] for p in paradigms}
    return plot_paradigms(runs, out)
