"""Framework overhead: fedfm's in-process runtime vs a plain PyTorch loop doing the same work.

Both sides train the same model + adapter on the same Rotten Tomatoes clients for the
same rounds, local steps and batch size, and both average the client deltas
(weighted by examples). Each side runs in its own fresh subprocess, so peak RSS is its
own. Printed: wall time of the federated training (set-up excluded and shown apart)
and peak memory, with fedfm / floor ratios. Nothing here asserts a time.

    .venv/bin/python benchmarks/overhead_minilm.py                      # MiniLM + LoRA, 3 rounds
    .venv/bin/python benchmarks/overhead_minilm.py --model tiny-bert --adapter full
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def _overrides(a: argparse.Namespace) -> list[str]:
    return [f'model.name="{a.model}"', f'adapter.method="{a.adapter}"', f"federation.clients={a.clients}",
            f"federation.clients_per_round={a.clients}", f"federation.rounds={a.rounds}",
            f"client.max_steps={a.steps}", f"client.batch_size={a.batch}", "eval.every=1000000",
            f"runtime.threads={a.threads}", 'partition.method="iid"', "data.test_by_group=false",
            f"data.max_examples={a.examples}"]


def fedfm_side(a: argparse.Namespace) -> dict:
    from fedfm.config import load_config
    from fedfm.experiment import Experiment
    from fedfm.round import run_round

    t0 = time.perf_counter()
    exp = Experiment.build(load_config(None, _overrides(a)))
    state = exp.initial_state()
    t1 = time.perf_counter()
    for _ in range(a.rounds):
        state, _ = run_round(state, exp.plan)
    t2 = time.perf_counter()
    return {"setup_s": t1 - t0, "train_s": t2 - t1, "norm": _norm(state.params)}


def floor_side(a: argparse.Namespace) -> dict:
    """No framework: transformers + peft + a hand loop, the way a script would do it.
    It reuses fedfm's data split only, so both sides see identical clients."""
    import numpy as np
    import torch
    from transformers import AutoModelForSequenceClassification

    from fedfm.config import load_config
    from fedfm.experiment import prepare_data
    from fedfm.models.load import load_classifier

    t0 = time.perf_counter()
    cfg = load_config(None, _overrides(a))
    torch.set_num_threads(a.threads)
    roles = prepare_data(cfg)
    data, clients = roles.pool, roles
    model, tok = load_classifier(cfg.model.name, data.num_classes, cfg.seed)
    assert isinstance(model, torch.nn.Module) and AutoModelForSequenceClassification
    if a.adapter == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=list(cfg.adapter.targets or ["query", "value"]),
                                                 modules_to_save=["classifier"]))
    enc = tok(data.texts, truncation=True, max_length=cfg.model.max_length, padding="longest", return_tensors="pt")
    labels = torch.as_tensor(data.labels)
    model.train()  # from_pretrained returns eval mode; training means dropout on, as fedfm does
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    glob = {n: p.detach().clone() for n, p in params.items()}
    t1 = time.perf_counter()
    for rnd in range(a.rounds):
        acc = {n: torch.zeros_like(p) for n, p in glob.items()}
        total = 0
        for c, idx in enumerate(clients.train):
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(glob[n])
            opt = torch.optim.AdamW(params.values(), lr=cfg.client.lr)
            perm = np.random.default_rng([rnd, c]).permutation(idx)
            for s in range(a.steps):
                b = torch.as_tensor(perm[s * a.batch:(s + 1) * a.batch])
                if len(b) == 0:
                    break
                mask = enc["attention_mask"][b]
                width = int(mask.sum(1).max())
                loss = model(input_ids=enc["input_ids"][b, :width], attention_mask=mask[:, :width], labels=labels[b]).loss
                opt.zero_grad()
                loss.backward()
                opt.step()
            with torch.no_grad():
                for n, p in params.items():
                    acc[n] += (p - glob[n]) * len(idx)
            total += len(idx)
        glob = {n: glob[n] + acc[n] / total for n in glob}
    t2 = time.perf_counter()
    return {"setup_s": t1 - t0, "train_s": t2 - t1, "norm": _norm(glob)}


def _norm(params: dict) -> float:
    return float(sum(float((v.double() ** 2).sum()) for v in params.values()) ** 0.5)


def _child(side: str, a: argparse.Namespace) -> dict:
    out = fedfm_side(a) if side == "fedfm" else floor_side(a)
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="minilm-l6")
    p.add_argument("--adapter", default="lora", choices=["lora", "full"])
    p.add_argument("--clients", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--examples", type=int, default=3000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--child", choices=["fedfm", "floor"], help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(_child(a.child, a)))
        return
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    res = {}
    for side in ("floor", "fedfm"):  # fresh process each: own import cost, own peak memory
        proc = subprocess.run([sys.executable, __file__, "--child", side] + sys.argv[1:], capture_output=True,
                              text=True, env=env, check=True)
        res[side] = json.loads(proc.stdout.strip().splitlines()[-1])
    f, b = res["fedfm"], res["floor"]
    print(f"workload: {a.model} + {a.adapter}, {a.clients} clients x {a.steps} steps x {a.rounds} rounds, "
          f"batch {a.batch}, {a.threads} threads")
    print(f"{'':10s}{'setup s':>10s}{'train s':>10s}{'peak MB':>10s}{'|params|':>12s}")
    for name, r in (("floor", b), ("fedfm", f)):
        print(f"{name:10s}{r['setup_s']:10.2f}{r['train_s']:10.2f}{r['peak_rss_mb']:10.0f}{r['norm']:12.4f}")
    print(f"ratio fedfm/floor: train time {f['train_s'] / b['train_s']:.3f}, peak memory "
          f"{f['peak_rss_mb'] / b['peak_rss_mb']:.3f}")


if __name__ == "__main__":
    main()
