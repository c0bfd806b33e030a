"""Scale: time per round and memory at 100, 1,000 and 10,000 simulated clients in one process.

MiniLM-L6 + LoRA (r=8, query/key/value/dense) on Rotten Tomatoes split IID over N clients (5% held
out for test, so 10,000 clients hold about one review each), 10 clients per round, 2 local steps,
top-k 1% uplink compression with error feedback (so every client that has trained keeps a
residual as large as its LoRA update: the per-client state that grows with N). Each N runs in a
fresh process; printed: set-up time, mean wall time per round, peak RSS, and the client-state
store's RAM and disk bytes.

A second part fills a ClientStateStore with one LoRA-sized residual for EVERY client (what a run
reaches once all N clients have trained), under a RAM budget, and reports RAM, disk and the time
to read a cohort's states back: the store is what keeps 10,000 x 1.35 MB (13.6 GB) off the heap.

    .venv/bin/python benchmarks/scale.py                     # N = 100, 1000, 10000
    .venv/bin/python benchmarks/scale.py --clients 100 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def overrides(n: int, a: argparse.Namespace) -> list[str]:
    return [f"federation.clients={n}", f"federation.clients_per_round={a.per_round}", f"federation.rounds={a.rounds}",
            'partition.method="iid"', "data.test_by_group=false", "data.test_fraction=0.05",
            f"client.max_steps={a.steps}", "client.batch_size=8", "eval.every=1000000", f"runtime.threads={a.threads}",
            'compression.name="topk"', "compression.fraction=0.01", "compression.error_feedback=true",
            f"runtime.client_state_mb={a.state_mb}"]


def child(n: int, a: argparse.Namespace) -> dict:
    from fedfm.config import load_config
    from fedfm.experiment import Experiment
    from fedfm.round import run_round

    t0 = time.perf_counter()
    exp = Experiment.build(load_config(None, overrides(n, a)))
    state = exp.initial_state()
    setup = time.perf_counter() - t0
    walls = []
    for _ in range(a.rounds):
        t = time.perf_counter()
        state, _ = run_round(state, exp.plan)
        walls.append(time.perf_counter() - t)
    store = exp.client_states
    out = {"clients": n, "setup_s": setup, "round_s": sum(walls[1:] or walls) / len(walls[1:] or walls),
           "first_round_s": walls[0], "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "states": len(store), "state_ram_mb": store.memory_bytes / 2**20, "state_disk_mb": store.disk_bytes / 2**20}
    exp.close()
    return out


def store_fill(n: int, a: argparse.Namespace) -> dict:
    """Every one of n clients holding a residual shaped like the default experiment's MiniLM-LoRA
    update (the real parameter shapes), under the RAM budget."""
    import tempfile

    import torch

    from fedfm.runtime.store import ClientStateStore

    from fedfm.config import load_config
    from fedfm.experiment import build_model

    handle = build_model(load_config(None, []), num_labels=2)  # the default experiment's MiniLM + LoRA
    shapes = [tuple(v.shape) for v in handle.trainable.values()]
    del handle
    with tempfile.TemporaryDirectory(dir=a.spill_dir) as d:
        store = ClientStateStore(directory=d, memory_budget=int(a.state_mb * 2**20))
        gen = torch.Generator().manual_seed(0)
        template = {f"t{i}": torch.randn(s, generator=gen) for i, s in enumerate(shapes)}
        per_client = sum(v.numel() * 4 for v in template.values())
        t0 = time.perf_counter()
        for c in range(n):
            store[c] = {k: v + c for k, v in template.items()}
        fill = time.perf_counter() - t0
        cohort = list(range(0, n, max(1, n // 10)))[:10]
        t1 = time.perf_counter()
        ok = all(torch.equal(store[c]["t0"], template["t0"] + c) for c in cohort)
        read = time.perf_counter() - t1
        res = {"clients": n, "per_client_mb": per_client / 2**20, "ram_mb": store.memory_bytes / 2**20,
               "disk_mb": store.disk_bytes / 2**20, "in_ram": store.num_in_memory, "on_disk": store.num_on_disk,
               "fill_s": fill, "read_cohort_s": read, "exact": ok,
               "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        store.close()
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", default="100,1000,10000")
    p.add_argument("--per-round", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--state-mb", type=float, default=512.0, help="RAM budget of the client-state store")
    p.add_argument("--spill-dir", default=None, help="where the store-fill part spills (default: the temp dir)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--fill", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child is not None:
        print(json.dumps(store_fill(int(a.child), a) if a.fill else child(int(a.child), a)))
        return
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    sizes = [int(x) for x in a.clients.split(",")]
    runs, fills = [], []
    for n in sizes:
        for fill, sink in ((False, runs), (True, fills)):
            cmd = [sys.executable, __file__, "--child", str(n), *sys.argv[1:]] + (["--fill"] if fill else [])
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                raise SystemExit(proc.stderr[-3000:])
            sink.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"\nMiniLM-L6 + LoRA, {a.per_round} clients per round, {a.steps} steps, top-k 1% + error feedback, "
          f"state budget {a.state_mb:g} MB")
    print("| clients | set-up s | s per round | peak RSS MB | states kept | state RAM MB | state disk MB |")
    print("|---|---|---|---|---|---|---|")
    for r in runs:
        print(f"| {r['clients']:,} | {r['setup_s']:.1f} | {r['round_s']:.2f} | {r['peak_rss_mb']:.0f} | {r['states']} | "
              f"{r['state_ram_mb']:.1f} | {r['state_disk_mb']:.1f} |")
    print("\nEvery client holding a residual (store only, synthetic states of the LoRA's size):")
    print("| clients | MB per client | RAM MB | disk MB | in RAM | on disk | fill s | read 10 states s | peak RSS MB | exact |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in fills:
        print(f"| {r['clients']:,} | {r['per_client_mb']:.2f} | {r['ram_mb']:.0f} | {r['disk_mb']:.0f} | {r['in_ram']} | "
              f"{r['on_disk']} | {r['fill_s']:.1f} | {r['read_cohort_s']:.3f} | {r['peak_rss_mb']:.0f} | {r['exact']} |")


if __name__ == "__main__":
    main()
