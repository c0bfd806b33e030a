"""Peer benchmark: one federated text-classification job run three ways, side by side.

    1. fedfm in-process      ``fedfm.runner.run`` with runtime.name = "inprocess"
    2. fedfm on flower-sim   the same call with runtime.name = "flower-sim" (Flower's simulation
                             engine: fedfm's ServerApp in this process, its ClientApp in Ray actors)
    3. a plain Flower app    written here the way Flower's docs write a PyTorch app (Message API:
                             ``@app.train()`` ClientApp, ``@app.main()`` ServerApp running flwr's
                             own ``flwr.serverapp.strategy.FedAvg`` via ``strategy.start``), run with
                             ``flwr.simulation.run_simulation``. It borrows only fedfm's
                             ``build_client_side(cfg)``, for the identical model, tokenized data and
                             partition; its training is a plain torch loop with the steps, batch
                             size, learning rate and optimizer of fedfm's LocalTrainer.

All three use the same supernodes/clients, clients per round, rounds, local steps and batch size,
and evaluate the global model on the same test set after every round. Each way runs in its own
fresh subprocess (its own session). The parent measures wall time from spawning it to its exit
(interpreter start, imports, Ray start-up and shut-down included) and samples, every 0.2 s, the
summed RSS and PSS of the whole process tree (the child, Ray's gcs_server/raylet/agents, the
ClientApp actors). Printed: the table, ratios to fedfm in-process, the final test accuracy of each
way (so the ways visibly did the same work), and a breakdown of where the time goes. Timings are
printed, never asserted.

    .venv/bin/python benchmarks/peers/flower_vs_fedfm.py            # MiniLM + LoRA, 5 rounds
    .venv/bin/python benchmarks/peers/flower_vs_fedfm.py --quick    # tiny-bert (tests' TINY), 2 rounds
    .venv/bin/python benchmarks/peers/flower_vs_fedfm.py --rounds 3 --ways inprocess,flower-app
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Optional

WAYS = ("inprocess", "flower-sim", "flower-app")
LABELS = {"inprocess": "fedfm in-process", "flower-sim": "fedfm flower-sim", "flower-app": "plain Flower app"}
CONFIG_ENV = "FEDFM_PEERS_CONFIG"
"""The experiment TOML for the plain Flower app (run_simulation gives apps an empty run config;
Ray's workers inherit the environment, as fedfm's own launcher relies on)."""
T0_ENV = "FEDFM_PEERS_T0"
"""The parent's clock (time.time()) just before it spawned the child: every mark is relative to it."""
RAY_CPUS = 2  # Ray's num_cpus for the plain app; fedfm's launcher uses os.cpu_count() (2 on the reference box)

# tests/conftest.py's TINY experiment (random-init tiny-bert, full fine-tuning)
TINY = ['model.name="tiny-bert"', "model.max_length=32", 'adapter.method="full"',
        "data.max_examples=600", "data.test_fraction=0.25", 'partition.method="iid"',
        "federation.clients=4", "federation.clients_per_round=2", "client.max_steps=3",
        "client.batch_size=16", "client.lr=1e-3"]
# default: pretrained all-MiniLM-L6-v2 with LoRA (rank 8 on query/key/value/dense, fedfm's default
# adapter), where local training dominates a round and accuracy visibly rises from the start
MINILM = ['model.name="minilm-l6"', "model.max_length=48", 'adapter.method="lora"',
          "data.max_examples=1200", "data.test_fraction=0.25", "data.test_by_group=false",
          'partition.method="iid"', "federation.clients=4", "federation.clients_per_round=2",
          "client.max_steps=8", "client.batch_size=16", "client.lr=3e-3"]


def overrides(a: argparse.Namespace) -> list[str]:
    base = list(TINY if a.quick else MINILM)
    rounds = a.rounds if a.rounds is not None else (2 if a.quick else 5)
    extra = [f"federation.rounds={rounds}", "eval.every=1", f"runtime.threads={a.threads}"]
    if a.steps is not None:
        extra.append(f"client.max_steps={a.steps}")
    return base + extra


def _now() -> float:
    return time.time() - float(os.environ.get(T0_ENV, "0") or 0)


# ---------------------------------------------------------------------------------------------
# The plain Flower app. Its functions live at module level so that Ray pickles them by reference
# (the child imports this file as the module `flower_vs_fedfm`, and Flower's Ray backend puts the
# driver's sys.path on the actors' PYTHONPATH): module state then persists per actor process, as a
# Flower app's cached dataset does. The decorators are applied in `make_apps` only so that
# importing this file (the parent, the in-process child) never imports flwr.
# ---------------------------------------------------------------------------------------------

_STATE: dict[str, Any] = {}
"""Per process: the client side (built once per Ray actor) and the ServerApp's outcome."""


def _client_side() -> tuple[Any, float]:
    """(cfg, data roles, model handle, tokenized pool), built on first use in this process, and the
    seconds this call spent building it (0 when cached)."""
    if "side" in _STATE:
        return _STATE["side"], 0.0
    t = time.time()
    from fedfm.config import loads_config
    from fedfm.experiment import build_client_side

    cfg = loads_config(os.environ[CONFIG_ENV])
    data, handle, tokens, _ = build_client_side(cfg)  # sets torch threads to runtime.threads
    _STATE["side"] = (cfg, data, handle, tokens)
    return _STATE["side"], time.time() - t


def _batch(tokens: Any, idx: Any) -> dict[str, Any]:
    """Model inputs for examples ``idx``, cut to their longest example (as fedfm batches)."""
    import numpy as np
    import torch

    index = torch.from_numpy(np.asarray(idx, dtype=np.int64))
    lengths = tokens.lengths[index]
    width = int(lengths.max())
    mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    return {"input_ids": tokens.input_ids[index, :width], "attention_mask": mask, "labels": tokens.labels[index]}


def _load(model: Any, arrays: Any) -> None:
    """Load an ArrayRecord of the trainable parameters (the frozen rest is identical everywhere)."""
    result = model.load_state_dict(arrays.to_torch_state_dict(), strict=False)
    if result.unexpected_keys:
        raise ValueError(f"unexpected parameters {result.unexpected_keys[:3]}")


def _trainable_record(model: Any) -> Any:
    from flwr.app import ArrayRecord

    return ArrayRecord({n: p.detach() for n, p in model.named_parameters() if p.requires_grad})


def flower_train(msg: Any, context: Any) -> Any:
    """ClientApp train: load the global trainable params, run the local steps, reply with them."""
    t = time.time()
    import numpy as np
    import torch
    from flwr.app import Message, MetricRecord, RecordDict

    from fedfm.round import client_seed

    (cfg, data, handle, tokens), build_s = _client_side()
    build_s = time.time() - t if build_s else 0.0  # first message in this process: imports included
    t = time.time()
    model = handle.model
    _load(model, msg.content["arrays"])
    pid = int(context.node_config["partition-id"])
    server_round = int(msg.content["config"]["server-round"])
    seed = client_seed(cfg.seed, server_round, pid)  # fedfm's per-(round, client) seed
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    c = cfg.client
    optimizer = torch.optim.AdamW(params, lr=float(msg.content["config"]["lr"]), weight_decay=c.weight_decay)
    idx = data.train[pid]
    losses: list[float] = []
    for _ in range(c.epochs):
        perm = rng.permutation(idx)
        for start in range(0, len(perm), c.batch_size):
            if c.max_steps is not None and len(losses) >= c.max_steps:
                break
            loss = model(**_batch(tokens, perm[start:start + c.batch_size])).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    metrics = MetricRecord({"train_loss": float(np.mean(losses)), "num-examples": len(idx), "steps": len(losses),
                            "partition": pid, "round": server_round, "pid": os.getpid(), "build_s": build_s,
                            "train_s": time.time() - t,
                            "received_at": _now()})
    return Message(content=RecordDict({"arrays": _trainable_record(model), "metrics": metrics}), reply_to=msg)


def _evaluate(handle: Any, tokens: Any, idx: Any, batch_size: int) -> dict[str, float]:
    """Test loss and accuracy; batches in length order (less padding, as fedfm's evaluation)."""
    import numpy as np
    import torch

    idx = np.asarray(idx)[np.argsort(tokens.lengths[idx].numpy(), kind="stable")]
    model = handle.model
    model.eval()
    loss_sum, correct = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(idx), batch_size):
            batch = _batch(tokens, idx[start:start + batch_size])
            out = model(**batch)
            loss_sum += float(out.loss) * len(batch["labels"])
            correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
    return {"accuracy": correct / len(idx), "loss": loss_sum / len(idx)}


def flower_main(grid: Any, context: Any) -> None:
    """ServerApp main: flwr's FedAvg over the supernodes, centralized evaluation after each round."""
    from flwr.app import ConfigRecord, MetricRecord
    from flwr.serverapp.strategy import FedAvg
    from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

    out = _STATE.setdefault("server", {"rounds": [], "clients": []})
    try:
        (cfg, data, handle, tokens), build_s = _client_side()  # the server's global model and test set
        out["build_s"], out["ready_build_at"] = build_s, _now()
        random.seed(cfg.seed)  # FedAvg samples nodes with `random`
        fed = cfg.federation

        def collect(records: list[Any], weight_key: str) -> Any:  # keep each client's metrics, then the default
            for r in records:
                out["clients"].append({k: v for k, v in next(iter(r.metric_records.values())).items()})
            return aggregate_metricrecords(records, weight_key)

        def global_evaluate(server_round: int, arrays: Any) -> Any:
            t = time.time()
            _load(handle.model, arrays)
            m = _evaluate(handle, tokens, data.test, cfg.eval.batch_size)
            out["rounds"].append({"round": server_round, "t": _now(), "eval_s": time.time() - t, **m})
            return MetricRecord(m)

        strategy = FedAvg(fraction_train=fed.clients_per_round / fed.clients, fraction_evaluate=0.0,
                          min_train_nodes=fed.clients_per_round, min_available_nodes=fed.clients,
                          train_metrics_aggr_fn=collect)
        strategy.start(grid=grid, initial_arrays=_trainable_record(handle.model), num_rounds=fed.rounds,
                       train_config=ConfigRecord({"lr": cfg.client.lr}), evaluate_fn=global_evaluate)
        out["done"] = True
    except BaseException:  # Flower logs and swallows ServerApp errors; keep it for the child to report
        out["error"] = traceback.format_exc()
        raise


def make_apps() -> tuple[Any, Any]:
    """(ServerApp, ClientApp), registered as Flower's docs do with ``@app.main()`` / ``@app.train()``."""
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp

    client_app, server_app = ClientApp(), ServerApp()
    client_app.train()(flower_train)
    server_app.main()(flower_main)
    return server_app, client_app


# ---------------------------------------------------------------------------------------------
# Children: one per way, each writes a JSON result file.
# ---------------------------------------------------------------------------------------------

def _timed(owner: Any, name: str, sink: list[dict[str, float]]) -> None:
    """Wrap ``owner.name`` to record (start, seconds) of each call; behaviour is unchanged."""
    orig = getattr(owner, name)

    @functools.wraps(orig)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t = time.time()
        try:
            return orig(*args, **kwargs)
        finally:
            sink.append({"t": t - float(os.environ[T0_ENV]), "s": time.time() - t})

    setattr(owner, name, wrapper)


def _instrument_flower(rec: dict[str, Any]) -> None:
    """Time ray.init and every Grid.send_and_receive round-trip of Flower's simulation (driver side)."""
    import ray
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    rec["ray_init"], rec["trips"] = [], []
    _timed(ray, "init", rec["ray_init"])
    orig = InMemoryGrid.send_and_receive

    def send_and_receive(self: Any, messages: Any, *, timeout: Optional[float] = None) -> Any:
        messages = list(messages)
        t = time.time()
        replies = list(orig(self, messages, timeout=timeout))
        rec["trips"].append({"t": t - float(os.environ[T0_ENV]), "s": time.time() - t, "n": len(messages),
                             "replies": len(replies),
                             "type": ",".join(sorted({m.metadata.message_type for m in messages}))})
        return replies

    InMemoryGrid.send_and_receive = send_and_receive  # type: ignore[method-assign]


def child_fedfm(a: argparse.Namespace, way: str, work: Path) -> dict[str, Any]:
    from fedfm.config import load_config
    from fedfm.experiment import Experiment
    from fedfm.runner import Callbacks, run
    from fedfm.trainers.local import LocalTrainer

    rec: dict[str, Any] = {"imported_at": _now(), "rounds": [], "clients": [], "build": [], "evals": [], "train": []}
    cfg = load_config(None, overrides(a) + [f'runtime.name="{way}"'])
    _timed(Experiment, "build", rec["build"])
    _timed(Experiment, "evaluate", rec["evals"])
    _timed(LocalTrainer, "train", rec["train"])  # in this process only: in-process clients, never Ray actors
    if way == "flower-sim":
        _instrument_flower(rec)
        from fedfm.runtime.flower.grid_runtime import GridRuntime

        rec["wait_nodes"], rec["identify"] = [], []
        _timed(GridRuntime, "_wait_for_nodes", rec["wait_nodes"])
        _timed(GridRuntime, "_identify", rec["identify"])

    def on_round_end(line: dict[str, Any]) -> None:
        rec["rounds"].append({"round": line["round"], "t": _now(), "accuracy": line.get("accuracy"),
                              "clients": line.get("clients"),
                              "train_loss": line.get("train_loss"), "wall_s": line.get("wall_s")})

    cb = Callbacks(on_start=lambda first, last: rec.__setitem__("ready_at", _now()),
                   on_client=lambda r: rec["clients"].append({k: float(v) for k, v in r.metrics.items()}),
                   on_round_end=on_round_end)
    summary = run(cfg, work / "run", cb)
    lines = [json.loads(s) for s in (work / "run" / "metrics.jsonl").read_text().splitlines() if s.strip()]
    rec.update(accuracy=summary["accuracy"], initial_accuracy=lines[0].get("accuracy"),
               steps=sum(c.get("steps", 0) for c in rec["clients"]), finished_at=_now())
    return rec


def child_flower_app(a: argparse.Namespace, work: Path) -> dict[str, Any]:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import flower_vs_fedfm as mod  # this file as an importable module: Ray pickles its functions by reference
    from flwr.simulation import run_simulation

    from fedfm.config import load_config, to_toml

    rec: dict[str, Any] = {"imported_at": _now()}
    cfg = load_config(None, overrides(a))
    _instrument_flower(rec)
    os.environ[CONFIG_ENV] = to_toml(cfg)
    server_app, client_app = mod.make_apps()
    backend = {"client_resources": {"num_cpus": 1},
               "init_args": {"num_cpus": RAY_CPUS, "include_dashboard": False, "log_to_driver": False}}
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=cfg.federation.clients,
                   backend_config=backend)
    out = mod._STATE.get("server", {})
    if "error" in out or not out.get("done"):
        raise RuntimeError(f"the Flower ServerApp did not finish: {out.get('error', 'no outcome')}")
    evals = out["rounds"]
    rec.update(ready_at=evals[0]["t"], server_build_s=out["build_s"], clients=out["clients"],
               rounds=[{"round": e["round"], "t": e["t"], "accuracy": e["accuracy"],
                        "clients": sorted(int(c["partition"]) for c in out["clients"] if c["round"] == e["round"])}
                       for e in evals[1:]],
               evals=[{"t": e["t"] - e["eval_s"], "s": e["eval_s"]} for e in evals],
               accuracy=evals[-1]["accuracy"], initial_accuracy=evals[0]["accuracy"],
               steps=sum(c["steps"] for c in out["clients"]), finished_at=_now())
    return rec


# ---------------------------------------------------------------------------------------------
# Parent: spawn, sample the process tree's memory, report.
# ---------------------------------------------------------------------------------------------

def _pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _tree(psutil: Any, root: int) -> list[Any]:
    """The child, its descendants, and anything else in its session (Ray processes that re-parent)."""
    procs = {root: psutil.Process(root)} if psutil.pid_exists(root) else {}
    try:
        for p in procs[root].children(recursive=True):
            procs[p.pid] = p
    except (KeyError, psutil.Error):
        pass
    for pid in psutil.pids():
        if pid not in procs:
            try:
                if os.getsid(pid) == root:
                    procs[pid] = psutil.Process(pid)
            except (OSError, psutil.Error):
                pass
    return list(procs.values())


def _kind(p: Any, root: int) -> str:
    """What a process of the tree is, for the memory breakdown."""
    if p.pid == root:
        return "driver"
    try:
        cmd = " ".join(p.cmdline()) or p.name()
    except Exception:
        return "other"
    if cmd.startswith("ray::"):
        return "ray worker (" + cmd.split()[0][5:].split(".")[0] + ")"
    for key in ("gcs_server", "raylet", "dashboard", "log_monitor", "runtime_env"):
        if key in cmd:
            return "ray " + key
    return "other"


def _watch(psutil: Any, proc: Any, every_s: float) -> dict[str, Any]:
    """Sample the child's process tree until it exits: peak summed RSS and PSS (bytes), peak process
    count, and the RSS by kind of process at the RSS peak."""
    peak = {"rss": 0, "pss": 0, "procs": 0, "kinds": {}}
    while proc.poll() is None:
        rss = pss = 0
        kinds: dict[str, list[float]] = {}
        tree = _tree(psutil, proc.pid)
        for p in tree:
            try:
                r = p.memory_info().rss
            except psutil.Error:
                continue
            rss += r
            pss += _pss_kb(p.pid) * 1024
            kinds.setdefault(_kind(p, proc.pid), []).append(r / 2**20)
        if rss > peak["rss"]:
            peak["rss"], peak["kinds"] = rss, kinds
        peak["pss"], peak["procs"] = max(peak["pss"], pss), max(peak["procs"], len(tree))
        try:
            proc.wait(timeout=every_s)  # returns at once when the child exits
        except subprocess.TimeoutExpired:
            pass
    return peak


def run_way(way: str, a: argparse.Namespace, work: Path) -> dict[str, Any]:
    import psutil

    wdir = work / way
    wdir.mkdir(parents=True, exist_ok=True)
    result, log = wdir / "result.json", wdir / "child.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0",
           "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_HOME": str(work / "flwr-home"),
           "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", way, "--result", str(result),
           "--threads", str(a.threads)] + (["--quick"] if a.quick else []) \
        + ([f"--rounds={a.rounds}"] if a.rounds is not None else []) + ([f"--steps={a.steps}"] if a.steps else [])
    with open(log, "wb") as logf:
        t0 = time.time()
        env[T0_ENV] = repr(t0)
        proc = subprocess.Popen(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            peak = _watch(psutil, proc, a.sample_s)
        except BaseException:  # interrupted: stop the child's whole session, then re-raise
            _reap_session(psutil, proc.pid, grace_s=0.0, include_root=True)
            raise
        wall = time.time() - t0
    leftovers = _reap_session(psutil, proc.pid)
    if proc.returncode != 0 or not result.is_file():
        tail = log.read_text(errors="replace").splitlines()[-30:]
        raise SystemExit(f"{way} failed (exit {proc.returncode}); log {log}:\n" + "\n".join(tail))
    rec = json.loads(result.read_text())
    rec.update(way=way, wall_s=wall, peak_rss_mb=peak["rss"] / 2**20, peak_pss_mb=peak["pss"] / 2**20,
               peak_procs=peak["procs"], rss_by_kind=peak["kinds"], leftovers=leftovers, log=str(log))
    return rec


def _reap_session(psutil: Any, sid: int, grace_s: float = 10.0, include_root: bool = False) -> int:
    """Processes of the child's session still alive after it exited (Ray shutting down): wait for
    them, then stop them. Returns how many had to be stopped."""
    deadline = time.time() + grace_s
    while True:
        alive = [p for p in _tree(psutil, sid) if include_root or p.pid != sid]
        if not alive or time.time() >= deadline:
            break
        time.sleep(0.5)
    if not alive:
        return 0
    for p in alive:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    _, still = psutil.wait_procs(alive, timeout=5)
    for p in still:
        try:
            p.kill()
        except psutil.Error:
            pass
    return len(alive)


def _fmt(x: Optional[float], spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def report(res: dict[str, dict[str, Any]], a: argparse.Namespace, load: tuple[Any, ...]) -> None:
    from fedfm.config import load_config

    cfg = load_config(None, overrides(a))
    f, c = cfg.federation, cfg.client
    print(f"workload: {cfg.model.name} + {cfg.adapter.method}"
          + (f" (rank {cfg.adapter.rank}, targets {list(cfg.adapter.targets or [])})"
             if cfg.adapter.method == "lora" else "")
          + f", {cfg.data.name} ({cfg.data.max_examples} examples, test {cfg.data.test_fraction:g}), "
          f"{f.clients} clients ({cfg.partition.method}), {f.clients_per_round} per round, {f.rounds} rounds, "
          f"{c.max_steps} local steps x batch {c.batch_size}, {c.optimizer} lr {c.lr:g}, eval every round, "
          f"torch threads {cfg.runtime.threads}, Ray num_cpus {RAY_CPUS} (1 per ClientApp actor)")
    print("config overrides (on fedfm's default experiment): " + " ".join(overrides(a)))
    print(f"machine: {os.cpu_count()} cores; load average (1/5/15 min) before {load[0]}, after {load[1]}")
    base = res.get("inprocess")
    head = (f"{'way':20s}{'wall s':>9s}{'peak RSS MB':>13s}{'peak PSS MB':>13s}{'procs':>7s}{'wall/inproc':>13s}"
            f"{'RSS/inproc':>12s}{'steps':>7s}{'acc r0':>8s}{'test acc':>10s}")
    print(head)
    print("-" * len(head))
    for way, r in res.items():
        tr = _fmt(r["wall_s"] / base["wall_s"], ".2f") if base else "-"
        mr = _fmt(r["peak_rss_mb"] / base["peak_rss_mb"], ".2f") if base else "-"
        print(f"{LABELS[way]:20s}{r['wall_s']:9.1f}{r['peak_rss_mb']:13.0f}{r['peak_pss_mb']:13.0f}{r['peak_procs']:7d}"
              f"{tr:>13s}{mr:>12s}{int(r['steps']):7d}{_fmt(r['initial_accuracy'], '.3f'):>8s}"
              f"{_fmt(r['accuracy'], '.4f'):>10s}")
    print("\nwhere the time goes (seconds from spawning the process):")
    for way, r in res.items():
        rounds = r["rounds"]
        ends = [x["t"] for x in rounds]
        durs = [b - a_ for a_, b in zip([r["ready_at"]] + ends[:-1], ends)]
        print(f"  {LABELS[way]}:")
        print(f"    imports done {r['imported_at']:.1f}; ready to train (model, data, round-0 eval) "
              f"{r['ready_at']:.1f}; "
              f"round 1 {durs[0]:.1f}" + (f", rounds 2-{len(durs)} mean {sum(durs[1:]) / len(durs[1:]):.1f}"
                                              if len(durs) > 1 else "")
              + f"; after the last round to exit {r['wall_s'] - ends[-1]:.1f}")
        print("    accuracy after each round: " + ", ".join(_fmt(x["accuracy"], ".3f") for x in rounds)
              + "; clients per round: " + " ".join(str(x["clients"] or []).replace(" ", "") for x in rounds))
        evals = r.get("evals", [])
        if evals:
            print(f"    server-side evaluation: {len(evals)} x {sum(e['s'] for e in evals) / len(evals):.2f} s")
        if r.get("build"):
            print(f"    Experiment.build in the driver (data, model, tokenize): {r['build'][0]['s']:.1f}")
        if way == "inprocess" and r.get("train"):
            ts = [x["s"] for x in r["train"]]
            print(f"    local training per client: mean {sum(ts) / len(ts):.2f} s "
                  f"({len(ts)} client turns, one after another)")
        if r.get("ray_init"):
            ri = r["ray_init"][0]
            print(f"    ray.init: {ri['s']:.1f} (at {ri['t']:.1f})")
        if way == "flower-sim":
            wn, ident = r.get("wait_nodes", []), r.get("identify", [])
            if wn:
                print(f"    GridRuntime waiting for nodes + identify, round 1: {wn[0]['s']:.1f} "
                      f"(identify calls: {len(ident)}, {sum(x['s'] for x in ident):.1f} s in all)")
        if way == "flower-app":
            print(f"    ServerApp build of the global model + test set (driver): {r['server_build_s']:.1f}")
            builds = [cl["build_s"] for cl in r["clients"] if cl["build_s"] > 0]
            trains = [cl["train_s"] for cl in r["clients"]]
            print(f"    ClientApp first-message set-up per Ray actor (import torch/transformers/peft, data, model, "
                  f"tokenize): {', '.join(f'{b:.1f}' for b in builds)}"
                  f" over {len({int(cl['pid']) for cl in r['clients']})} actor processes; "
                  f"local training per client: mean {sum(trains) / len(trains):.2f} s")
        for trip in [t for t in r.get("trips", []) if t["n"]]:
            print(f"    round-trip {trip['type']:6s} x{trip['n']}: {trip['s']:6.2f} s (sent at {trip['t']:.1f})")
        kinds = sorted(r["rss_by_kind"].items(), key=lambda kv: -sum(kv[1]))
        print("    RSS at the peak, MB: " + "; ".join(
            f"{k} {sum(v):.0f}" + (f" ({len(v)} x ~{sum(v) / len(v):.0f})" if len(v) > 1 else "") for k, v in kinds)
            + f" ({r['peak_procs']} processes at most)"
            + (f"; {r['leftovers']} processes still alive 10 s after exit were stopped" if r["leftovers"] else ""))
        print(f"    log: {r['log']}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tests' TINY config (tiny-bert, full), 2 rounds")
    p.add_argument("--rounds", type=int, default=None, help="federated rounds (default 5; 2 with --quick)")
    p.add_argument("--steps", type=int, default=None, help="local steps per client per round")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (runtime.threads)")
    p.add_argument("--ways", default=",".join(WAYS), help=f"comma list of {', '.join(WAYS)}")
    p.add_argument("--out", default=None, help="working directory (default: a fresh temp dir)")
    p.add_argument("--json", default=None, help="also write all results to this JSON file")
    p.add_argument("--sample-s", type=float, default=0.2, help="memory sampling interval")
    p.add_argument("--child", choices=WAYS, help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        work = Path(a.result).parent
        rec = child_flower_app(a, work) if a.child == "flower-app" else child_fedfm(a, a.child, work)
        Path(a.result).write_text(json.dumps(rec))
        return
    ways = [w.strip() for w in a.ways.split(",") if w.strip()]
    bad = [w for w in ways if w not in WAYS]
    if bad:
        raise SystemExit(f"unknown ways {bad}; choose from {', '.join(WAYS)}")
    work = Path(a.out) if a.out else Path(tempfile.mkdtemp(prefix="fedfm-peers-"))
    work.mkdir(parents=True, exist_ok=True)
    load_before = tuple(round(x, 2) for x in os.getloadavg())
    res = {}
    for way in ways:  # one after another: each way has the machine (as far as other jobs allow) to itself
        print(f"running {LABELS[way]} ...", file=sys.stderr, flush=True)
        res[way] = run_way(way, a, work)
        print(f"  {res[way]['wall_s']:.1f} s, test accuracy {res[way]['accuracy']:.4f}", file=sys.stderr, flush=True)
    load_after = tuple(round(x, 2) for x in os.getloadavg())
    report(res, a, (load_before, load_after))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
