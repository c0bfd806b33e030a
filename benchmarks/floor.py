"""The floor: plain PyTorch doing a benchmark workload's federated training, no framework.

What a researcher would write by hand for configs/bench-w1.toml and configs/bench-w2.toml: one
model, a loop over rounds and clients, load the global weights, local steps, accumulate the
example-weighted delta, FedAvg; test accuracy at the end. It never imports fedfm (fedfm's own
import cost is part of what the overhead benchmark measures). The workload's sizes come from the
config file (read with tomllib), so both sides run the same work: the same model, clients,
examples per client, local steps, batch size, optimizer and learning rate (the examples in each
client differ: the floor draws its own iid split).

    python benchmarks/floor.py configs/bench-w1.toml [--rounds N] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

T0 = time.perf_counter()

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

import numpy as np
import torch


def _data(cfg: dict) -> tuple[torch.Tensor, torch.Tensor, int, dict]:
    name = cfg["data"]["name"]
    if name == "digits":
        # scikit-learn's digits file read directly: `import sklearn.datasets` alone takes seconds,
        # which would bill the floor for an import fedfm does not make either.
        import importlib.util
        from pathlib import Path

        spec = importlib.util.find_spec("sklearn")
        path = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / "digits.csv.gz"
        raw = np.loadtxt(path, delimiter=",")
        images, target = raw[:, :64].reshape(-1, 8, 8), raw[:, 64].astype(np.int64)
        x = torch.tensor(np.round(images * 255 / 16).astype(np.uint8)).float().div(127.5).sub(1).unsqueeze(1)
        return x, torch.tensor(target, dtype=torch.long), 10, {}
    if name == "random-tokens":
        gen = torch.Generator().manual_seed(0)
        n, length = 200, int(cfg["model"].get("max_length", 64))
        ids = torch.randint(1000, 30522, (n, length), generator=gen)
        ids[:, 0], ids[:, -1] = 101, 102  # [CLS] ... [SEP]
        return ids, torch.randint(0, 2, (n,), generator=gen), 2, {}
    raise SystemExit(f"floor: no plain implementation of dataset {name!r}")


def _model(cfg: dict, num_labels: int) -> torch.nn.Module:
    name = cfg["model"]["name"]
    torch.manual_seed(int(cfg.get("seed", 0)))
    if name == "mlp":
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 128), torch.nn.ReLU(),
                                   torch.nn.Linear(128, num_labels))
    if name == "bert-w2":
        from transformers import BertConfig, BertForSequenceClassification

        bc = BertConfig(vocab_size=30522, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                        intermediate_size=1024, max_position_embeddings=512, num_labels=num_labels)
        return BertForSequenceClassification(bc)
    raise SystemExit(f"floor: no plain implementation of model {name!r}")


def _loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    out = model(x) if isinstance(model, torch.nn.Sequential) else model(input_ids=x).logits
    return torch.nn.functional.cross_entropy(out, y)


def _logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x) if isinstance(model, torch.nn.Sequential) else model(input_ids=x).logits


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    with open(a.config, "rb") as f:
        cfg = tomllib.load(f)
    torch.set_num_threads(a.threads)
    fed, cl = cfg["federation"], cfg.get("client", {})
    rounds = a.rounds or int(fed["rounds"])
    clients, per_round = int(fed["clients"]), int(fed.get("clients_per_round", fed["clients"]))
    bs, lr, epochs = int(cl.get("batch_size", 16)), float(cl.get("lr", 5e-4)), int(cl.get("epochs", 1))
    max_steps = cl.get("max_steps")
    x, y, num_labels, _ = _data(cfg)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(y))
    n_test = int(round(len(y) * float(cfg["data"].get("test_fraction", 0.2))))
    test, train = order[:n_test], order[n_test:]
    parts = np.array_split(train, clients)
    model = _model(cfg, num_labels)
    model.train()
    params = [p for p in model.parameters()]
    glob = [p.detach().clone() for p in params]
    t_setup = time.perf_counter()
    for rnd in range(rounds):
        cohort = rng.choice(clients, size=per_round, replace=False)
        acc = [torch.zeros_like(g) for g in glob]
        total = 0
        for c in cohort:
            idx = parts[c]
            with torch.no_grad():
                for p_, g in zip(params, glob):
                    p_.copy_(g)
            opt = (torch.optim.SGD(params, lr=lr) if cl.get("optimizer", "adamw") == "sgd"
                   else torch.optim.AdamW(params, lr=lr))
            steps = 0
            for _ in range(epochs):
                perm = rng.permutation(idx)
                for s in range(0, len(perm), bs):
                    if max_steps is not None and steps >= max_steps:
                        break
                    b = torch.from_numpy(perm[s:s + bs])
                    loss = _loss(model, x[b], y[b])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    steps += 1
            with torch.no_grad():
                for a_, p_, g in zip(acc, params, glob):
                    a_.add_(p_ - g, alpha=len(idx))
            total += len(idx)
        glob = [g + a_ / total for g, a_ in zip(glob, acc)]
    t_train = time.perf_counter()
    with torch.no_grad():
        for p_, g in zip(params, glob):
            p_.copy_(g)
        model.eval()
        tb = torch.from_numpy(test)
        pred = torch.cat([_logits(model, x[tb[i:i + 256]]).argmax(-1) for i in range(0, len(tb), 256)])
        accuracy = float((pred == y[tb]).float().mean())
    print(json.dumps({"accuracy": accuracy, "setup_s": t_setup - T0, "train_s": t_train - t_setup,
                      "rounds": rounds}))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
