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
from typing import TYPE_CHECKING, Any, Callable, Optional

from fedfm.checkpoint import load_client_states, load_state, save_state
from fedfm.config import ExperimentConfig, load_config, to_toml
from fedfm.errors import ConfigError
from fedfm.report.metrics import append_line, read_lines, truncate_after
from fedfm.schedule import Stage
from fedfm.types import ClientResult, RoundReport

if TYPE_CHECKING:
    from fedfm.runtime.base import Runtime


@dataclass
class Callbacks:
    """Hooks for progress display; every one is optional."""

    on_start: Optional[Callable[[int, Optional[int]], None]] = None  # (first stage, last stage if known)
    on_round_start: Optional[Callable[[int, list[int]], None]] = None
    on_client: Optional[Callable[[ClientResult], None]] = None
    on_round_end: Optional[Callable[[dict[str, Any]], None]] = None


def run(cfg: ExperimentConfig, out: Path, callbacks: Optional[Callbacks] = None,
        runtime: Optional["Runtime"] = None) -> dict[str, Any]:
    """Start a new run in ``out`` (which must not hold one already); ``runtime`` replaces the
    in-process runtime (the Flower ServerApp passes its own)."""
    if (out / "config.toml").exists():
        raise ConfigError(f"{str(out)!r} already holds a run; resume it with --resume {out} or choose another --out")
    if runtime is None and cfg.runtime.name != "inprocess":
        from fedfm.runtime.flower.launch import launch

        return launch(cfg, out, callbacks)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.toml").write_text(to_toml(cfg), encoding="utf-8")
    return _execute(cfg, out, callbacks or Callbacks(), runtime)


def resume(out: Path, callbacks: Optional[Callbacks] = None, runtime: Optional["Runtime"] = None) -> dict[str, Any]:
    """Continue the run in ``out`` from its last checkpoint, with its saved config."""
    if not (out / "config.toml").is_file():
        raise ConfigError(f"{str(out)!r} is not a run directory (no config.toml); nothing to resume")
    cfg = load_config(out / "config.toml")
    if runtime is None and cfg.runtime.name != "inprocess":
        from fedfm.runtime.flower.launch import launch

        return launch(cfg, out, callbacks)
    return _execute(cfg, out, callbacks or Callbacks(), runtime)


def _execute(cfg: ExperimentConfig, out: Path, cb: Callbacks, runtime: Optional["Runtime"] = None) -> dict[str, Any]:
    from fedfm.experiment import Experiment
    from fedfm.schedule import build_schedule, decide

    exp = Experiment.build(cfg, runtime)
    try:
        return _execute_built(cfg, out, cb, exp)
    finally:
        exp.close()


def _execute_built(cfg: ExperimentConfig, out: Path, cb: Callbacks, exp: Any) -> dict[str, Any]:
    from fedfm.schedule import build_schedule, decide

    policy, budget = build_schedule(cfg)
    metrics_path, ckpt_dir = out / "metrics.jsonl", out / "checkpoints"
    loaded = load_state(ckpt_dir)
    state, elapsed = (loaded[0], float(loaded[1].get("elapsed_s", 0.0))) if loaded else (exp.initial_state(), 0.0)
    if loaded and exp.client_states is not None:
        exp.client_states.update(load_client_states(ckpt_dir, loaded[1]))
    if loaded and exp.replicas is not None:
        exp.replicas.update(load_client_states(ckpt_dir, loaded[1], "replicas"))
    if loaded:
        exp.restore(state)
    truncate_after(metrics_path, state.round if loaded else -1)
    if not loaded:
        append_line(metrics_path, {"round": 0, "phase": "init", **exp.evaluate(state.params),
                                   "val_loss": exp.validation_loss(state.params)})
    lines = read_lines(metrics_path)
    history, initial_loss = _history(lines), lines[0].get("val_loss")
    decision = decide(policy, budget, history, initial_loss)
    if cb.on_start:
        cb.on_start(state.round + 1, planned_stages(cfg))
    while decision.kind is not None:
        t0 = time.perf_counter()
        state, report, cost = _stage(decision.kind, state, exp, cb)
        val = exp.validation_loss(state.params)
        history.append(Stage(decision.kind, val, cost))
        upcoming = decide(policy, budget, history, initial_loss)
        last = upcoming.kind is None
        evals = exp.evaluate(state.params) if state.round % cfg.eval.every == 0 or last else {}
        if val is not None:
            evals["val_loss"] = val
        elapsed += time.perf_counter() - t0
        line = _line(report, decision, evals, cost, elapsed)
        append_line(metrics_path, line)
        if state.round % cfg.checkpoint.every == 0 or last:
            save_state(ckpt_dir, state, {"elapsed_s": elapsed}, exp.client_states, exp.replicas)
        if cb.on_round_end:
            cb.on_round_end(line)
        decision = upcoming
    return finish(out, cfg, exp)


def _stage(kind: str, state: Any, exp: Any, cb: Callbacks) -> tuple[Any, RoundReport, float]:
    """Run one central stage or one federated round; returns (state, report, compute cost)."""
    from fedfm.round import run_round, sample_cohort

    if kind == "central":
        return central_stage(state, exp)
    cfg = exp.cfg
    if cb.on_round_start:
        cb.on_round_start(state.round + 1, sample_cohort(cfg.seed, state.round + 1, cfg.federation.clients,
                                                         cfg.federation.clients_per_round))
    costs: list[float] = []

    def on_result(result: ClientResult) -> None:
        costs.append(float(result.metrics.get("examples_seen", 0.0)))
        if cb.on_client:
            cb.on_client(result)

    state, report = run_round(state, exp.plan, on_result)
    return state, report, sum(costs)


def central_stage(state: Any, exp: Any) -> tuple[Any, RoundReport, float]:
    """The server trains the global trainable params on its public data; nothing travels."""
    from fedfm.experiment import SERVER
    from fedfm.round import client_seed
    from fedfm.types import ClientTask, ServerState

    t0 = time.perf_counter()
    rnd = state.round + 1
    # seeded like a client whose id no real client has (ids are 0..clients-1)
    seed = client_seed(exp.cfg.seed, rnd, exp.cfg.federation.clients)
    task = ClientTask(round=rnd, client_id=SERVER, params=state.params, seed=seed)
    params, metrics = exp.central.train(task)
    report = RoundReport(round=rnd, clients=(), train_loss=metrics["train_loss"], bytes_up=0, bytes_down=0,
                         wall_s=time.perf_counter() - t0)
    # public data costs no privacy: the pipeline's state (privacy ledger, clip) passes through unchanged
    return (ServerState(round=rnd, params=params, opt_state=state.opt_state, extra=state.extra), report,
            metrics["examples_seen"])


def _history(lines: list[dict[str, Any]]) -> list[Stage]:
    return [Stage(r["phase"], r.get("val_loss"), float(r.get("cost", 0.0))) for r in lines if r["round"] > 0]


def planned_stages(cfg: ExperimentConfig) -> Optional[int]:
    """Stages the progress bar expects (None when a budget or policy makes it unknown)."""
    s = cfg.schedule
    if s.central_steps == 0 and s.budget_rounds is None and s.budget_compute is None:
        return cfg.federation.rounds
    return s.budget_rounds


def _line(report: RoundReport, decision: Any, evals: dict[str, Any], cost: float, elapsed: float) -> dict[str, Any]:
    return {
        "round": report.round, "phase": decision.kind, "reason": decision.reason, "train_loss": report.train_loss,
        "loss": evals.get("loss"), "accuracy": evals.get("accuracy"), "f1": evals.get("f1"),
        "perplexity": evals.get("perplexity"),
        **{k: v for k, v in evals.items() if k not in ("loss", "accuracy", "f1", "perplexity")},
        "bytes_up": report.bytes_up, "bytes_down": report.bytes_down, "clients": list(report.clients),
        "rejected": list(report.rejected), "cost": cost, "wall_s": report.wall_s, "elapsed_s": elapsed,
        **({"sim_time_s": report.sim_time} if report.sim_time is not None else {}),
        **({"staleness": list(report.staleness)} if report.staleness else {}),
        **({"epsilon": report.epsilon, "delta": report.delta} if report.epsilon is not None else {}),
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
    if cfg.eval.plot:
        plot_runs([(out.name, lines)], out / "metrics.png")
    return summary


def summarize(lines: list[dict[str, Any]]) -> dict[str, Any]:
    evals = [r for r in lines if r.get("loss") is not None]
    rounds = [r for r in lines if r["round"] > 0]
    last = evals[-1] if evals else {}
    return {
        "rounds": max((r["round"] for r in lines), default=0),
        "accuracy": last.get("accuracy"), "f1": last.get("f1"), "loss": last.get("loss"),
        "perplexity": last.get("perplexity"),
        "best_accuracy": max((r["accuracy"] for r in evals if r.get("accuracy") is not None), default=None),
        "initial_accuracy": evals[0].get("accuracy") if evals and evals[0]["round"] == 0 else None,
        "initial_perplexity": evals[0].get("perplexity") if evals and evals[0]["round"] == 0 else None,
        "bytes_up": sum(r.get("bytes_up", 0) for r in rounds),
        "bytes_down": sum(r.get("bytes_down", 0) for r in rounds),
        "rejected_updates": sum(len(r.get("rejected", [])) for r in rounds),
        "backdoor_success": last.get("backdoor_success"),
        "local_accuracy": last.get("local_accuracy"), "client_accuracy_mean": last.get("client_accuracy_mean"),
        "epsilon": max((r["epsilon"] for r in rounds if r.get("epsilon") is not None), default=None),
        "wall_s": rounds[-1]["elapsed_s"] if rounds else 0.0,
        "sim_time_s": max((r["sim_time_s"] for r in rounds if r.get("sim_time_s") is not None), default=None),
    }
