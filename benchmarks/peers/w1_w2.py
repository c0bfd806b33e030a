"""Peer benchmark on the two benchmark workloads: fedfm against Flower and Apple's pfl-research.

Workloads (the sizes are read from the config files):

    w1  configs/bench-w1.toml  100 clients, a 64-128-10 MLP on scikit-learn's 8x8 digits (20% test),
                               all 100 clients per round, 5 rounds, 1 local epoch, batch 16, SGD lr 0.5
    w2  configs/bench-w2.toml  10 clients, a random-init 4-layer BERT (hidden 256, 11.2M parameters,
                               all trained), 200 random-token sequences of 64 tokens (5% test),
                               3 rounds, 1 local epoch, batch 16, AdamW lr 1e-4

Ways, each one fresh process (tree), run one after another:

    fedfm-sequential   fedfm run CONFIG --out TMP --quiet --set runtime.threads=1
    fedfm-vectorised   the same with --set runtime.vectorize=true
    flower-sim         a plain Flower app (Message API: an @app.train() ClientApp with a torch loop,
                       an @app.main() ServerApp running flwr's own FedAvg with strategy.start and a
                       centralized evaluate_fn), run by flwr.simulation.run_simulation on the Ray
                       backend: Ray num_cpus 2, ClientApp num_cpus 1 (two actors), one supernode per
                       client. It never imports fedfm.
    pfl-research       Apple's pfl (PyPI "pfl", PyTorch): PyTorchModel + FederatedAveraging on a
                       SimulatedBackend with WeightByDatapoints, central SGD lr 1.0 (plain FedAvg).
                       It runs in another interpreter (--pfl-python; pfl cannot share fedfm's venv,
                       see benchmarks/peers/README.md) and is skipped, with the reason printed, when
                       that is not given or cannot import pfl.

The two peer ways share this file's workload code, which borrows benchmarks/floor.py (fedfm's
"plain PyTorch" floor, no fedfm import): the same model architecture built from the same seed
(torch.nn.Sequential Flatten-Linear(64,128)-ReLU-Linear(128,10); transformers'
BertForSequenceClassification with bert-w2's BertConfig), the digits loaded with scikit-learn's
load_digits and scaled as fedfm does, and for W2 random token ids of the same shape ([CLS] 1000..30521
x 62 [SEP], 2 random labels; not fedfm's random-tokens texts, whose labels are random too). The
split is floor.py's: a seeded permutation, the first 20% (W2: 5%) as the test set, the rest cut
IID into the clients. Local training: the config's epochs, batch size, optimizer (SGD without
momentum, or AdamW without weight decay: fedfm's defaults) and learning rate. The final global model
is evaluated on the held-out set at the end.

Measured from outside, as a user feels it: wall time from spawning the process to its exit
(interpreter start-up, imports, data, Ray start-up and shut-down, evaluation, fedfm's run
directory); peak memory is the largest sum of PSS over the process tree (the child, its
descendants and every process in its session, so Ray's gcs_server/raylet/workers count), sampled
every 25 ms. ``--repeat`` keeps each way's fastest run. Nothing is asserted.

    .venv/bin/python benchmarks/peers/w1_w2.py --workload w1 --rounds 1             # smoke test
    .venv/bin/python benchmarks/peers/w1_w2.py --pfl-python /tmp/pflvenv/bin/python  # W1 and W2, all ways
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Optional

HERE = Path(__file__).resolve().parent
BENCH = HERE.parent
ROOT = BENCH.parent
CONFIGS = {"w1": ROOT / "configs" / "bench-w1.toml", "w2": ROOT / "configs" / "bench-w2.toml"}
WAYS = ("fedfm-sequential", "fedfm-vectorised", "flower-sim", "pfl-research")
BASE = "fedfm-sequential"
RAY_CPUS = 2
SAMPLE_S = 0.025
CONFIG_ENV, ROUNDS_ENV = "FEDFM_W1W2_CONFIG", "FEDFM_W1W2_ROUNDS"
"""The workload for the Flower app's processes (Ray's workers inherit the environment)."""


# ---------------------------------------------------------------------------------------------
# The workload, as the peer ways see it. Runs in any interpreter with torch, numpy and
# scikit-learn (W2: transformers): it imports benchmarks/floor.py, never fedfm.
# ---------------------------------------------------------------------------------------------

def _floor() -> Any:
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    import floor

    return floor


def workload(config: Path, rounds: Optional[int]) -> dict[str, Any]:
    """The config's data (floor.py's), test set, IID client partitions and training settings."""
    import numpy as np

    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]

    floor = _floor()
    with open(config, "rb") as f:
        cfg = tomllib.load(f)
    x, y, num_labels, _ = floor._data(cfg)
    seed = int(cfg.get("seed", 0))
    order = np.random.default_rng(seed).permutation(len(y))
    n_test = int(round(len(y) * float(cfg["data"].get("test_fraction", 0.2))))
    fed, cl = cfg["federation"], cfg.get("client", {})
    clients = int(fed["clients"])
    return {"cfg": cfg, "x": x, "y": y, "num_labels": num_labels, "seed": seed,
            "test": order[:n_test], "parts": np.array_split(order[n_test:], clients),
            "clients": clients, "per_round": int(fed.get("clients_per_round", clients)),
            "rounds": int(rounds or fed["rounds"]), "epochs": int(cl.get("epochs", 1)),
            "batch_size": int(cl.get("batch_size", 16)), "lr": float(cl.get("lr", 5e-4)),
            "optimizer": cl.get("optimizer", "adamw"), "momentum": float(cl.get("momentum", 0.0)),
            "weight_decay": float(cl.get("weight_decay", 0.0))}


def optimizer_factory(w: dict[str, Any]) -> Any:
    """``f(params, lr=...)`` building the workload's local optimizer (fedfm's LocalTrainer defaults)."""
    import functools

    import torch

    if w["optimizer"] == "sgd":
        return functools.partial(torch.optim.SGD, momentum=w["momentum"], weight_decay=w["weight_decay"])
    if w["optimizer"] == "adamw":
        return functools.partial(torch.optim.AdamW, weight_decay=w["weight_decay"])
    raise SystemExit(f"no plain implementation of optimizer {w['optimizer']!r}")


def test_accuracy(w: dict[str, Any], model: Any) -> float:
    import torch

    floor = _floor()
    model.eval()
    tb = torch.from_numpy(w["test"])
    with torch.no_grad():
        pred = torch.cat([floor._logits(model, w["x"][tb[i:i + 256]]).argmax(-1) for i in range(0, len(tb), 256)])
    return float((pred == w["y"][tb]).float().mean())


# ---------------------------------------------------------------------------------------------
# flower-sim: a plain Flower app. Its functions live at module level so that Ray pickles them by
# reference (the child imports this file as the module `w1_w2`; Flower's Ray backend puts the
# driver's sys.path on the actors' PYTHONPATH), and each process caches its data and model, as a
# Flower app's task module does.
# ---------------------------------------------------------------------------------------------

_STATE: dict[str, Any] = {}


def _flower_side() -> tuple[dict[str, Any], Any]:
    if "w" not in _STATE:
        import torch

        torch.set_num_threads(1)
        w = workload(Path(os.environ[CONFIG_ENV]), int(os.environ.get(ROUNDS_ENV) or 0) or None)
        _STATE["w"], _STATE["model"] = w, _floor()._model(w["cfg"], w["num_labels"])
    return _STATE["w"], _STATE["model"]


def _params_record(model: Any) -> Any:
    from flwr.app import ArrayRecord

    return ArrayRecord({n: p.detach() for n, p in model.named_parameters()})


def flower_train(msg: Any, context: Any) -> Any:
    """ClientApp train: load the global model, train the local epochs, reply with the weights."""
    import numpy as np
    import torch
    from flwr.app import Message, MetricRecord, RecordDict

    w, model = _flower_side()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict(), strict=False)
    pid = int(context.node_config["partition-id"])
    server_round = int(msg.content["config"]["server-round"])
    rng = np.random.default_rng([w["seed"], server_round, pid])
    idx, bs, floor = w["parts"][pid], w["batch_size"], _floor()
    model.train()
    opt = optimizer_factory(w)(model.parameters(), lr=float(msg.content["config"]["lr"]))
    steps = 0
    for _ in range(w["epochs"]):
        perm = rng.permutation(idx)
        for s in range(0, len(perm), bs):
            b = torch.from_numpy(perm[s:s + bs])
            loss = floor._loss(model, w["x"][b], w["y"][b])
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
    metrics = MetricRecord({"num-examples": len(idx), "steps": steps})
    return Message(content=RecordDict({"arrays": _params_record(model), "metrics": metrics}), reply_to=msg)


def flower_main(grid: Any, context: Any) -> None:
    """ServerApp main: flwr's FedAvg over all supernodes; the global model is evaluated on the
    test set before the first round and after the last."""
    from flwr.app import ConfigRecord, MetricRecord
    from flwr.serverapp.strategy import FedAvg

    out = _STATE.setdefault("server", {})
    try:
        w, model = _flower_side()  # the server's global model and test set
        random.seed(w["seed"])  # FedAvg samples nodes with `random`

        def evaluate(server_round: int, arrays: Any) -> Any:
            if server_round not in (0, w["rounds"]):
                return None
            model.load_state_dict(arrays.to_torch_state_dict(), strict=False)
            out[f"accuracy_{server_round}"] = acc = test_accuracy(w, model)
            return MetricRecord({"accuracy": acc})

        strategy = FedAvg(fraction_train=w["per_round"] / w["clients"], fraction_evaluate=0.0,
                          min_train_nodes=w["per_round"], min_available_nodes=w["clients"])
        strategy.start(grid=grid, initial_arrays=_params_record(model), num_rounds=w["rounds"],
                       train_config=ConfigRecord({"lr": w["lr"]}), evaluate_fn=evaluate)
        out["done"] = True
    except BaseException:  # Flower logs and swallows ServerApp errors: keep it for the child to report
        out["error"] = traceback.format_exc()
        raise


def child_flower(a: argparse.Namespace) -> dict[str, Any]:
    for d in (str(BENCH), str(HERE)):
        if d not in sys.path:
            sys.path.insert(0, d)
    import w1_w2 as mod  # this file as an importable module: Ray pickles its functions by reference
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    os.environ[CONFIG_ENV], os.environ[ROUNDS_ENV] = str(CONFIGS[a.workload]), str(a.rounds or 0)
    client_app, server_app = ClientApp(), ServerApp()
    client_app.train()(mod.flower_train)
    server_app.main()(mod.flower_main)
    w, _ = mod._flower_side()
    backend = {"client_resources": {"num_cpus": 1},
               "init_args": {"num_cpus": RAY_CPUS, "include_dashboard": False, "log_to_driver": False}}
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=w["clients"],
                   backend_config=backend)
    out = mod._STATE.get("server", {})
    if "error" in out or not out.get("done"):
        raise RuntimeError(f"the Flower ServerApp did not finish: {out.get('error', 'no outcome')}")
    return {"accuracy": out[f"accuracy_{w['rounds']}"], "initial_accuracy": out["accuracy_0"]}


# ---------------------------------------------------------------------------------------------
# pfl-research: pfl's simulated federated learning with its PyTorch model, in one process (pfl's
# default simulation; several workers need pfl's distributed launch, for GPUs and clusters).
# ---------------------------------------------------------------------------------------------

def child_pfl(a: argparse.Namespace) -> dict[str, Any]:
    import torch
    from pfl.aggregate.simulate import SimulatedBackend
    from pfl.aggregate.weighting import WeightByDatapoints
    from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
    from pfl.data.federated_dataset import FederatedDataset
    from pfl.data.sampling import get_user_sampler
    from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams
    from pfl.metrics import Weighted
    from pfl.model.pytorch import PyTorchModel

    torch.set_num_threads(1)
    floor = _floor()
    w = workload(CONFIGS[a.workload], a.rounds)
    net = floor._model(w["cfg"], w["num_labels"])

    class Task(torch.nn.Module):
        """pfl's PyTorchModel wants the module to define ``loss`` and ``metrics`` over a user's data."""

        def __init__(self, net: Any) -> None:
            super().__init__()
            self.net = net

        def loss(self, x: Any, y: Any) -> Any:
            self.train()
            return floor._loss(self.net, x, y)

        @torch.no_grad()
        def metrics(self, x: Any, y: Any) -> dict[str, Any]:
            self.eval()
            logits = floor._logits(self.net, x)
            loss = torch.nn.functional.cross_entropy(logits, y, reduction="sum")
            return {"loss": Weighted(float(loss), len(y)),
                    "accuracy": Weighted(float((logits.argmax(-1) == y).sum()), len(y))}

    task = Task(net)
    initial = test_accuracy(w, net)
    users = {uid: [w["x"][torch.from_numpy(p)], w["y"][torch.from_numpy(p)]] for uid, p in enumerate(w["parts"])}
    # minimize_reuse: a cohort of all users trains each of them once per round
    data = FederatedDataset.from_slices(users, get_user_sampler("minimize_reuse", list(users)))
    model = PyTorchModel(model=task, local_optimizer_create=optimizer_factory(w),
                         central_optimizer=torch.optim.SGD(task.parameters(), lr=1.0))
    backend = SimulatedBackend(training_data=data, val_data=data, postprocessors=[WeightByDatapoints()])
    FederatedAveraging().run(
        algorithm_params=NNAlgorithmParams(central_num_iterations=w["rounds"], evaluation_frequency=w["rounds"],
                                           train_cohort_size=w["per_round"], val_cohort_size=None),
        backend=backend, model=model,
        model_train_params=NNTrainHyperParams(local_learning_rate=w["lr"], local_num_epochs=w["epochs"],
                                              local_batch_size=w["batch_size"]),
        model_eval_params=NNEvalHyperParams(local_batch_size=256), callbacks=[])
    return {"accuracy": test_accuracy(w, net), "initial_accuracy": initial}


# ---------------------------------------------------------------------------------------------
# Parent: spawn each way, sample its process tree's memory, print the table.
# ---------------------------------------------------------------------------------------------

def _stat(pid: str) -> Optional[tuple[int, int]]:
    """(ppid, session id) of a process, from /proc/PID/stat."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            s = f.read()
    except OSError:
        return None
    fields = s[s.rfind(b")") + 2:].split()  # state, ppid, pgrp, session, ...
    return int(fields[1]), int(fields[3])


def process_tree(root: int) -> list[int]:
    """The root, every process of its session (it is a session leader) and their descendants: one
    cheap pass over /proc (psutil's per-process objects take ~50 ms a pass on a loaded box)."""
    parent: dict[int, int] = {}
    members = set()
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _stat(name)
            if st is not None:
                pid = int(name)
                parent[pid] = st[0]
                if pid == root or st[1] == root:
                    members.add(pid)
    for pid in parent:  # descendants that left the session (setsid)
        p, hops = parent.get(pid), 0
        while p and p not in members and hops < 64:
            p, hops = parent.get(p), hops + 1
        if p in members:
            members.add(pid)
    return sorted(members)


def measure(cmd: list[str], log: Path, env: dict[str, str], every_s: float = SAMPLE_S) -> dict[str, Any]:
    """Wall time, peak summed PSS of the process tree and the tree's size then; the child runs in its
    own session, whose leftovers (Ray shutting down) are stopped 10 s after it exits."""
    import psutil

    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    from flower_vs_fedfm import _pss_kb, _reap_session

    with open(log, "wb") as logf:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
        peak, procs = 0, 1
        try:
            while proc.poll() is None:
                tree = process_tree(proc.pid)
                total = sum(_pss_kb(pid) for pid in tree) * 1024
                if total > peak:
                    peak, procs = total, len(tree)
                try:
                    proc.wait(timeout=every_s)
                except subprocess.TimeoutExpired:
                    pass
        except BaseException:  # interrupted: stop the child's whole session, then re-raise
            _reap_session(psutil, proc.pid, grace_s=0.0, include_root=True)
            raise
        wall = time.perf_counter() - start
    leftovers = _reap_session(psutil, proc.pid)
    return {"wall_s": wall, "peak_mb": peak / 2**20, "procs": procs, "returncode": proc.returncode,
            "leftovers": leftovers}


def child_env(work: Path) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "RAY_USAGE_STATS_ENABLED": "0", "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_HOME": str(work / "flwr-home"), "TOKENIZERS_PARALLELISM": "false"}


def run_way(way: str, wl: str, a: argparse.Namespace, work: Path, tag: str) -> dict[str, Any]:
    """One run of one way; the accuracy comes from fedfm's summary.json or the child's result file."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    import overhead

    wdir = work / wl / f"{way}-{tag}"
    wdir.mkdir(parents=True, exist_ok=True)
    result = wdir / "result.json"
    if way.startswith("fedfm-"):
        ns = argparse.Namespace(threads=1, rounds=a.rounds, workers=2, plot=True)  # fedfm writes metrics.png
        cmd = overhead.command(way[len("fedfm-"):], CONFIGS[wl], wdir / "run", ns)
    else:
        python = a.pfl_python if way == "pfl-research" else sys.executable
        cmd = [python, str(Path(__file__).resolve()), "--child", way, "--workload", wl, "--result", str(result)] \
            + ([f"--rounds={a.rounds}"] if a.rounds else [])
    r = measure(cmd, wdir / "child.log", child_env(work))
    r["log"] = str(wdir / "child.log")
    if r["returncode"] != 0:
        tail = (wdir / "child.log").read_text(errors="replace").splitlines()[-25:]
        r["error"] = f"exit {r['returncode']}; log {r['log']}:\n" + "\n".join(tail)
        return r
    if way.startswith("fedfm-"):
        r["accuracy"] = overhead.accuracy("sequential", r, wdir / "run")
    else:
        r.update(json.loads(result.read_text()))
    return r


def pfl_status(python: Optional[str], workloads: list[str]) -> dict[str, Optional[str]]:
    """Per workload: None when the pfl way can run there, else why not."""
    if not python:
        return {wl: "--pfl-python not given (pfl needs its own venv; see benchmarks/peers/README.md)"
                for wl in workloads}
    probe = ("import pfl, torch, sklearn; from pfl.model.pytorch import PyTorchModel; "
             "import importlib.metadata as m; print(m.version('pfl'), torch.__version__); "
             "import transformers")
    try:
        p = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        return {wl: f"{python} cannot run: {e}" for wl in workloads}
    if not p.stdout.strip():
        err = (p.stderr.strip().splitlines() or ["no output"])[-1]
        return {wl: f"{python} cannot import pfl[pytorch] and scikit-learn: {err}" for wl in workloads}
    print(f"pfl-research: pfl {p.stdout.split()[0]}, torch {p.stdout.split()[1]} ({python})")
    no_tf = p.returncode != 0
    return {wl: (f"transformers is not importable by {python}" if wl == "w2" and no_tf else None)
            for wl in workloads}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", default="w1,w2", help="comma-separated: w1, w2")
    p.add_argument("--ways", default=",".join(WAYS), help=f"comma-separated subset of {', '.join(WAYS)}")
    p.add_argument("--rounds", type=int, default=None, help="override the configs' rounds")
    p.add_argument("--repeat", type=int, default=1, help="runs per way; the fastest is kept")
    p.add_argument("--pfl-python", default=None, help="python of a venv with pfl[pytorch] (and scikit-learn; "
                                                      "transformers for w2); without it pfl-research is skipped")
    p.add_argument("--out", default=None, help="working directory for run dirs and logs (default: a temp dir)")
    p.add_argument("--child", choices=("flower-sim", "pfl-research"), help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        rec = child_flower(a) if a.child == "flower-sim" else child_pfl(a)
        Path(a.result).write_text(json.dumps(rec))
        return
    ways = [w.strip() for w in a.ways.split(",") if w.strip()]
    workloads = [w.strip() for w in a.workload.split(",") if w.strip()]
    bad = [w for w in ways if w not in WAYS] + [w for w in workloads if w not in CONFIGS]
    if bad:
        raise SystemExit(f"unknown {bad}; ways: {', '.join(WAYS)}; workloads: {', '.join(CONFIGS)}")
    missing = [m for m in ("psutil",) + (("flwr", "ray") if "flower-sim" in ways else ())
               if importlib.util.find_spec(m) is None]
    if missing:
        print(f"skipped: {', '.join(missing)} not installed (pip install 'fedfm[bench]')")
        return
    pfl = pfl_status(a.pfl_python, workloads) if "pfl-research" in ways else {}
    work = Path(a.out) if a.out else Path(tempfile.mkdtemp(prefix="fedfm-w1w2-"))
    work.mkdir(parents=True, exist_ok=True)
    failed = False
    for wl in workloads:
        load_before = os.getloadavg()
        rows: dict[str, dict[str, Any]] = {}
        notes = []
        for way in ways:
            if way == "pfl-research" and pfl.get(wl):
                notes.append(f"pfl-research skipped: {pfl[wl]}")
                continue
            best = None
            for k in range(a.repeat):
                print(f"{wl}: running {way} ({k + 1}/{a.repeat}) ...", file=sys.stderr, flush=True)
                r = run_way(way, wl, a, work, str(k))
                if "error" in r:
                    best = r
                    break
                print(f"  {r['wall_s']:.1f} s, {r['peak_mb']:.0f} MB, accuracy {r['accuracy']}", file=sys.stderr,
                      flush=True)
                if best is None or r["wall_s"] < best["wall_s"]:
                    best = r
            rows[way] = best
        load_after = os.getloadavg()
        base = rows.get(BASE) if BASE in rows and "error" not in rows[BASE] else None
        print(f"\n{wl}: {CONFIGS[wl].relative_to(ROOT)}" + (f", rounds overridden to {a.rounds}" if a.rounds else "")
              + f"; best of {a.repeat}; {os.cpu_count()} cores, load average (1/5/15 min) before "
              + "/".join(f"{x:.2f}" for x in load_before) + ", after " + "/".join(f"{x:.2f}" for x in load_after))
        print(f"| way | wall s | peak MB (PSS, process tree) | processes | test accuracy | wall / {BASE} "
              f"| memory / {BASE} |")
        print("|---|---|---|---|---|---|---|")
        for way, r in rows.items():
            if "error" in r:
                failed = True
                print(f"| {way} | failed | - | - | - | - | - |")
                notes.append(f"{way} failed ({r['error']})")
                continue
            acc = f"{r['accuracy']:.4f}" if r.get("accuracy") is not None else "-"
            rt = f"{r['wall_s'] / base['wall_s']:.2f}" if base else "-"
            rm = f"{r['peak_mb'] / base['peak_mb']:.2f}" if base else "-"
            print(f"| {way} | {r['wall_s']:.2f} | {r['peak_mb']:.0f} | {r['procs']} | {acc} | {rt} | {rm} |")
            if r.get("leftovers"):
                notes.append(f"{way}: {r['leftovers']} processes still alive 10 s after exit were stopped")
        for n in notes:
            print(n)
    print(f"\nlogs and run directories: {work}")
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
