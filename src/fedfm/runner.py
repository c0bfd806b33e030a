"""Run an experiment into a run directory: rounds, evaluation, checkpoints, outputs.

Run directory layout:
    config.toml        the fully resolved config
    metrics.jsonl      one line per round (round 0 = the initial model)
    summary.json       final and best metrics, bytes, wall time
    checkpoints/       last server state (safetensors + state.json)
    metrics.png        test accuracy and loss per round
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from fedfm.checkpoint import load_state, save_state
from fedfm.config import ExperimentConfig, load_config, to_toml
from fedfm.errors import ConfigError
from fedfm.report.metrics import append_line, read_lines, truncate_after
from fedfm.types import ClientResult, RoundReport


@dataclass
class Callbacks:
    """Hooks for progress display; every one is optional."""

    on_start: Optional[Callable[[int, int], None]] = None  # (first round, last round)
    on_round_start: Optional[Callable[[int, list[int]], None]] = None
    on_client: Optional[Callable[[ClientResult], None]] = None
    on_round_end: Optional[Callable[[dict[str, Any]], None]] = None


def run(cfg: ExperimentConfig, out: Path, callbacks: Optional[Callbacks] = None) -> dict[str, Any]:
    """Start a new run in ``out`` (which must not hold one already)."""
    if (out / "config.toml").exists():
        raise ConfigError(f"{str(out)!r} already holds a run; resume it with --resume {out} or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.toml").write_text(to_toml(cfg), encoding="utf-8")
    return _execute(cfg, out, callbacks or Callbacks())


def resume(out: Path, callbacks: Optional[Callbacks] = None) -> dict[str, Any]:
    """Continue the run in ``out`` from its last checkpoint, with its saved config."""
    if not (out / "config.toml").is_file():
        raise ConfigError(f"{str(out)!r} is not a run directory (no config.toml); nothing to resume")
    return _execute(load_config(out / "config.toml"), out, callbacks or Callbacks())


def _execute(cfg: ExperimentConfig, out: Path, cb: Callbacks) -> dict[str, Any]:
    from fedfm.experiment import Experiment
    from fedfm.round import run_round, sample_cohort

    exp = Experiment.build(cfg)
    metrics_path, ckpt_dir = out / "metrics.jsonl", out / "checkpoints"
    loaded = load_state(ckpt_dir)
    state, elapsed = (loaded[0], float(loaded[1].get("elapsed_s", 0.0))) if loaded else (exp.initial_state(), 0.0)
    truncate_after(metrics_path, state.round if loaded else -1)
    if not loaded:
        append_line(metrics_path, {"round": 0, "phase": "init", **_eval_fields(exp, state.params)})
    rounds = cfg.federation.rounds
    if cb.on_start:
        cb.on_start(state.round + 1, rounds)
    while state.round < rounds:
        t0 = time.perf_counter()
        rnd = state.round + 1
        if cb.on_round_start:
            cb.on_round_start(rnd, sample_cohort(cfg.seed, rnd, cfg.federation.clients, cfg.federation.clients_per_round))
        state, report = run_round(state, exp.plan, cb.on_client)
        evals = _eval_fields(exp, state.params) if rnd % cfg.eval.every == 0 or rnd == rounds else {}
        elapsed += time.perf_counter() - t0
        line = _line(report, evals, elapsed)
        append_line(metrics_path, line)
        if rnd % cfg.checkpoint.every == 0 or rnd == rounds:
            save_state(ckpt_dir, state, {"elapsed_s": elapsed})
        if cb.on_round_end:
            cb.on_round_end(line)
    return finish(out, cfg, exp)


def _eval_fields(exp: Any, params: Any) -> dict[str, Any]:
    return exp.evaluate(params)  # type: ignore[no-any-return]


def _line(report: RoundReport, evals: dict[str, Any], elapsed: float) -> dict[str, Any]:
    return {
        "round": report.round, "phase": "federated", "train_loss": report.train_loss,
        "loss": evals.get("loss"), "accuracy": evals.get("accuracy"), "f1": evals.get("f1"),
        **{k: v for k, v in evals.items() if k not in ("loss", "accuracy", "f1")},
        "bytes_up": report.bytes_up, "bytes_down": report.bytes_down, "clients": list(report.clients),
        "rejected": list(report.rejected), "wall_s": report.wall_s, "elapsed_s": elapsed,
    }


def finish(out: Path, cfg: ExperimentConfig, exp: Any) -> dict[str, Any]:
    """Write summary.json and metrics.png from metrics.jsonl."""
    from fedfm.report.plots import plot_runs

    lines = read_lines(out / "metrics.jsonl")
    summary = summarize(lines)
    summary.update({
        "trainable_params": sum(p.numel() for p in exp.handle.trainable.values()),
        "total_params": sum(p.numel() for p in exp.handle.model.parameters()),
        "model": cfg.model.name, "adapter": cfg.adapter.method, "algorithm": cfg.algorithm.name,
        "data": cfg.data.name, "clients": cfg.federation.clients, "seed": cfg.seed,
    })
    (out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    plot_runs([(out.name, lines)], out / "metrics.png")
    return summary


def summarize(lines: list[dict[str, Any]]) -> dict[str, Any]:
    evals = [r for r in lines if r.get("accuracy") is not None]
    rounds = [r for r in lines if r["round"] > 0]
    last = evals[-1] if evals else {}
    return {
        "rounds": max((r["round"] for r in lines), default=0),
        "accuracy": last.get("accuracy"), "f1": last.get("f1"), "loss": last.get("loss"),
        "best_accuracy": max((r["accuracy"] for r in evals), default=None),
        "initial_accuracy": evals[0]["accuracy"] if evals and evals[0]["round"] == 0 else None,
        "bytes_up": sum(r.get("bytes_up", 0) for r in rounds),
        "bytes_down": sum(r.get("bytes_down", 0) for r in rounds),
        "rejected_updates": sum(len(r.get("rejected", [])) for r in rounds),
        "wall_s": rounds[-1]["elapsed_s"] if rounds else 0.0,
    }
