"""Overhead of fedfm against the floor (plain PyTorch doing the same work), side by side.

Workloads are ordinary experiments: W1 = configs/bench-w1.toml (100 clients, 64-128-10 MLP on
scikit-learn's digits, 5 rounds, 1 local epoch, batch 16, SGD) and W2 = configs/bench-w2.toml
(10 clients, 4-layer BERT hidden 256 random init, 200 sequences of 64 tokens, 3 rounds). Ways:

    floor        benchmarks/floor.py: a hand-written loop (torch only; transformers for W2's model)
    sequential   fedfm run CONFIG  (clients one after another)
    vectorised   fedfm run CONFIG --set runtime.vectorize=true  (a cohort per batched vmap call)
    workers      fedfm run CONFIG --set runtime.workers=N  (clients across N forked processes)

Each way is one fresh process (or process tree), timed from outside as a user feels it: wall
time includes interpreter start-up, imports, data loading, evaluation at the end and writing
the run directory. Peak memory is the largest sum of PSS over the process tree (proportional
set size: pages shared between forked workers are counted once in all), sampled every 20 ms.
Ways run one after another, never concurrently; ``--repeat`` keeps each way's fastest run.
Nothing here asserts a time.

    .venv/bin/python benchmarks/overhead.py                      # W1 and W2
    .venv/bin/python benchmarks/overhead.py --workload w1 --rounds 200 --ways floor,vectorised
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {"w1": ROOT / "configs" / "bench-w1.toml", "w2": ROOT / "configs" / "bench-w2.toml"}
WAYS = ("floor", "sequential", "vectorised", "workers")


def command(way: str, config: Path, out: Path, a: argparse.Namespace) -> list[str]:
    rounds = ["--rounds", str(a.rounds)] if a.rounds else []
    if way == "floor":
        return [sys.executable, str(ROOT / "benchmarks" / "floor.py"), str(config), "--threads", str(a.threads),
                *rounds]
    sets = [f"runtime.threads={a.threads}", f"federation.rounds={a.rounds}" if a.rounds else None,
            f"checkpoint.every={a.rounds}" if a.rounds else None, None if a.plot else "eval.plot=false"]
    if way == "vectorised":
        sets.append("runtime.vectorize=true")
    if way == "workers":
        sets.append(f"runtime.workers={a.workers}")
    fedfm = str(Path(sys.executable).parent / "fedfm")
    return [fedfm, "run", str(config), "--out", str(out), "--quiet"] + [x for s in sets if s for x in ("--set", s)]


def measure(cmd: list[str], every_s: float = 0.02) -> dict[str, Any]:
    """Wall time and peak PSS (summed over the process tree) of one command."""
    import psutil

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peak, procs = 0, 1
    root = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            tree = [root] + root.children(recursive=True)
            total = 0
            for p in tree:
                try:
                    total += p.memory_full_info().pss
                except psutil.Error:
                    pass
            if total > peak:
                peak, procs = total, len(tree)
        except psutil.Error:
            pass
        time.sleep(every_s)
    wall = time.perf_counter() - start
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-2000:]}")
    return {"wall_s": wall, "peak_mb": peak / 2**20, "procs": procs, "stdout": out}


def accuracy(way: str, result: dict[str, Any], out: Path) -> Optional[float]:
    if way == "floor":
        return float(json.loads(result["stdout"].strip().splitlines()[-1])["accuracy"])
    summary = out / "summary.json"
    return float(json.loads(summary.read_text())["accuracy"]) if summary.is_file() else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", default="w1,w2", help="comma-separated: w1, w2")
    p.add_argument("--ways", default=",".join(WAYS), help=f"comma-separated subset of {', '.join(WAYS)}")
    p.add_argument("--rounds", type=int, default=None, help="override the configs' rounds (e.g. 200 for W1)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--workers", type=int, default=2, help="processes for the workers way")
    p.add_argument("--repeat", type=int, default=1, help="runs per way; the fastest is kept")
    p.add_argument("--no-plot", dest="plot", action="store_false",
                   help="fedfm skips metrics.png (eval.plot = false); the floor never plots")
    a = p.parse_args()
    ways = [w.strip() for w in a.ways.split(",") if w.strip()]
    bad = [w for w in ways if w not in WAYS]
    if bad:
        raise SystemExit(f"unknown ways {bad}; allowed: {', '.join(WAYS)}")
    for wl in [w.strip() for w in a.workload.split(",") if w.strip()]:
        if wl not in CONFIGS:
            raise SystemExit(f"unknown workload {wl!r}; allowed: {', '.join(CONFIGS)}")
        rows = {}
        for way in ways:
            best = None
            for _ in range(a.repeat):
                with tempfile.TemporaryDirectory() as tmp:
                    out = Path(tmp) / "run"
                    r = measure(command(way, CONFIGS[wl], out, a))
                    r["accuracy"] = accuracy(way, r, out)
                if best is None or r["wall_s"] < best["wall_s"]:
                    best = r
            rows[way] = best
        floor = rows.get("floor")
        print(f"\n{wl}: {CONFIGS[wl].name}" + (f", {a.rounds} rounds" if a.rounds else "") +
              ("" if a.plot else ", fedfm without metrics.png") +
              f", {a.threads} thread(s) per process, best of {a.repeat}")
        print(f"| way | wall s | peak MB (PSS) | processes | accuracy | wall / floor | memory / floor |")
        print("|---|---|---|---|---|---|---|")
        for way, r in rows.items():
            ratio_t = f"{r['wall_s'] / floor['wall_s']:.2f}" if floor else "-"
            ratio_m = f"{r['peak_mb'] / floor['peak_mb']:.2f}" if floor else "-"
            acc = f"{r['accuracy']:.4f}" if r["accuracy"] is not None else "-"
            print(f"| {way} | {r['wall_s']:.2f} | {r['peak_mb']:.0f} | {r['procs']} | {acc} | {ratio_t} | {ratio_m} |")


if __name__ == "__main__":
    main()
