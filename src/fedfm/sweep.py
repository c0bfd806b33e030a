"""`fedfm sweep`: a grid over any config keys, run and tabulated (sensitivity analysis)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from fedfm.compare import _mean_std, _pm
from fedfm.config import ExperimentConfig, load_config, parse_override
from fedfm.errors import ConfigError


COLUMNS = ("accuracy", "local_accuracy", "f1", "perplexity", "loss", "backdoor_success", "epsilon", "MB", "sim_time_s",
           "wall_s")


def parse_grid(items: Sequence[str]) -> list[tuple[str, list[Any]]]:
    """``key=v1,v2,...`` items -> [(key, [values])]; values are TOML literals (strings may be bare).
    A list value is written in brackets: ``adapter.targets=[\"query\"],[\"value\"]`` is not split inside brackets."""
    grid = []
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not text:
            raise ConfigError(f"grid item {item!r} is not of the form key=v1,v2 (e.g. schedule.threshold=0.01,0.05)")
        values = [parse_override(f"{key}={v}")[1] for v in _split_top(text)]
        grid.append((key.strip(), values))
    return grid


def _split_top(text: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += 1 if ch in "[{" else -1 if ch in "]}" else 0
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return parts + [cur]


def combos(grid: Sequence[tuple[str, list[Any]]]) -> list[dict[str, Any]]:
    keys = [k for k, _ in grid]
    return [dict(zip(keys, vals)) for vals in itertools.product(*(v for _, v in grid))]


def _slug(combo: dict[str, Any]) -> str:
    return "_".join(f"{k.split('.')[-1]}={json.dumps(v).strip(chr(34))}" for k, v in combo.items()).replace("/", "-")


def run_sweep(
    config: Optional[Path], base_overrides: Sequence[str], grid_items: Sequence[str], seeds: Sequence[int], out: Path,
    run_one: Optional[Callable[[ExperimentConfig, Path], Any]] = None,
    callbacks: Optional[Any] = None,
) -> list[dict[str, Any]]:
    """Validate every combination first (so a bad value fails before any work), then run them."""
    from fedfm import runner
    from fedfm.compare import _run_or_resume

    grid = parse_grid(grid_items)
    plans = []
    for combo in combos(grid):
        for seed in seeds:
            sets = list(base_overrides) + [f"{k}={json.dumps(v)}" for k, v in combo.items()] + [f"seed={seed}"]
            plans.append((combo, seed, load_config(config, sets)))
    run_one = run_one or (lambda c, d: _run_or_resume(c, d, runner, callbacks))
    for combo, seed, cfg in plans:
        run_one(cfg, out / _slug(combo) / f"seed{seed}")
    rows = []
    for combo in combos(grid):
        sums = [json.loads((out / _slug(combo) / f"seed{s}" / "summary.json").read_text()) for s in seeds]
        row: dict[str, Any] = dict(combo)
        for key in COLUMNS:
            vals = [(s["bytes_up"] + s["bytes_down"]) / 1e6 for s in sums] if key == "MB" else \
                [s[key] for s in sums if s.get(key) is not None]
            row.update(_mean_std(key, vals))
        row["stages"] = sum(s["rounds"] for s in sums) / len(sums)
        rows.append(row)
    _write(rows, [k for k, _ in grid], out)
    return rows


def _write(rows: list[dict[str, Any]], keys: list[str], out: Path) -> None:
    import csv

    # metric columns no run has (perplexity of a classifier, epsilon without DP) are left out
    cols = [c for c in COLUMNS if any(r.get(f"{c}_mean") is not None for r in rows)]
    header = keys + ["stages"] + [f"{c} (mean +/- std)" for c in cols]
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        md.append("| " + " | ".join([json.dumps(r[k]) for k in keys] + [f"{r['stages']:.1f}"] + [_pm(r, c) for c in cols]) + " |")
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    with (out / "sweep.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=keys + ["stages"] + [f"{c}_{s}" for c in cols for s in ("mean", "std")],
                           extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
