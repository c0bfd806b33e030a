"""`fedfm audit RUN_DIR`: what a finished run leaks, measured with the run's own model, data and
defenses.

Two adversaries:

- **Membership inference** with the final model (anyone who gets the model): the loss-threshold
  attack (Yeom et al. 2018) on the clients' training examples (members) vs the test examples
  (non-members); AUC 0.5 means nothing leaks.
- **Gradient inversion** by an honest-but-curious server that observes one client's next update:
  the client takes one SGD step (lr 1) from the final global params on a batch of its own data,
  and the server inverts what it would see under the run's configuration:
  no mechanism: the raw update; ``central`` DP: the clipped update (central DP noises the
  aggregate, so one update is not protected against the server, and the audit shows that);
  ``local`` DP: clipped plus the client's Gaussian noise; ``dpsgd``: per-example clipped gradients
  plus noise; secure aggregation: only the sum over the cohort, so the server inverts the sum
  of ``clients_per_round`` clients' updates against the target client's batch.
  Images: PSNR of the reconstruction vs a random-image baseline. Text: token recovery (the token
  set from embedding rows when embeddings train; optimisation over input embeddings when only an
  adapter travels) vs a random-token baseline.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedfm.errors import ConfigError


def audit_run(run_dir: Path, client: int = 0, batch_size: int = 1, iterations: int = 300,
              members: int = 400, seed: int = 0) -> dict[str, Any]:
    """Run both audits on ``run_dir``; writes ``audit.json`` there and returns its content."""
    from fedfm.audits.membership import example_stats, loss_threshold_attack
    from fedfm.checkpoint import load_state
    from fedfm.config import load_config
    from fedfm.experiment import Experiment

    if not (run_dir / "config.toml").is_file():
        raise ConfigError(f"{str(run_dir)!r} is not a run directory (no config.toml)")
    loaded = load_state(run_dir / "checkpoints")
    if loaded is None:
        raise ConfigError(f"{str(run_dir)!r} has no checkpoint to audit; run it first")
    cfg = load_config(run_dir / "config.toml")
    if cfg.task != "classify":
        raise ConfigError(f"the audits cover classification runs; this run's task is {cfg.task!r}")
    if not 0 <= client < cfg.federation.clients:
        raise ConfigError(f"--client {client} is not a client of this run (0..{cfg.federation.clients - 1})")
    exp = Experiment.build(cfg.model_copy(update={"attack": type(cfg.attack)()}))
    params = loaded[0].params
    exp.handle.set_params(params)
    rng = np.random.default_rng(seed)

    train = np.concatenate([idx for idx in exp.data.train if len(idx)])
    test = np.asarray(exp.data.test)
    pick = lambda idx: rng.choice(idx, size=min(members, len(idx)), replace=False)  # noqa: E731
    m_stats = example_stats(exp.handle, exp.tokens, pick(train), cfg.eval.batch_size)
    n_stats = example_stats(exp.handle, exp.tokens, pick(test), cfg.eval.batch_size)
    mia = loss_threshold_attack(m_stats.loss, n_stats.loss)

    inversion = _inversion(exp, cfg, params, client, batch_size, iterations, seed, rng)
    report = {"run": str(run_dir), "privacy": cfg.privacy.mechanism, "secagg": cfg.secagg.enabled,
              "membership": {"attack": "loss-threshold", **asdict(mia)}, "inversion": inversion}
    (run_dir / "audit.json").write_text(json.dumps(report, indent=2, default=_plain))
    return report


def _inversion(exp: Any, cfg: Any, params: dict, client: int, batch_size: int, iterations: int, seed: int,
               rng: np.random.Generator) -> dict[str, Any]:
    from fedfm.audits.inversion import audit_embedding_update, audit_image_update, audit_lora_update

    handle, tokens = exp.handle, exp.tokens
    cohort = [client] + [int(c) for c in rng.permutation([c for c in range(cfg.federation.clients) if c != client])
                         [: cfg.federation.clients_per_round - 1]] if cfg.secagg.enabled else [client]
    batches = [_batch(tokens, exp.data.train[c], batch_size, rng) for c in cohort if len(exp.data.train[c])]
    if not batches:
        raise ConfigError(f"client {client} holds no training examples")
    observed = None
    for b in batches:
        update = _observed_update(handle, params, b, cfg, rng)
        observed = update if observed is None else {k: observed[k] + update[k] for k in observed}
    target = batches[0]
    seen = "sum over the cohort (secure aggregation)" if len(batches) > 1 else "one client's update"
    if "pixel_values" in target:
        res = audit_image_update(handle, params, observed, target["pixel_values"], target["labels"],
                                 iterations=iterations)
        out = {"kind": "image", "psnr": float(res.psnr), "baseline_psnr": float(res.baseline_psnr),
               "mse": float(res.mse), "label_accuracy": float(res.label_accuracy)}
    else:
        emb = handle.model.get_input_embeddings().weight
        if any(p is emb for p in handle.trainable.values()):
            rec = audit_embedding_update(handle, observed, target, rel_tol=1e-6,
                                         seed=seed)
            kind = "text: token set from embedding rows"
        else:
            rec = audit_lora_update(handle, params, observed, target, seed=seed, iterations=iterations)
            kind = "text: adapter-gradient inversion"
        out = {"kind": kind, "precision": rec.precision, "recall": rec.recall, "f1": rec.f1,
               "baseline_f1": rec.baseline_f1}
    handle.set_params(params)
    return {"observed": seen, "client": client, "batch_size": batch_size, **out}


def _batch(tokens: Any, idx: np.ndarray, batch_size: int, rng: np.random.Generator) -> dict[str, torch.Tensor]:
    chosen = rng.choice(idx, size=min(batch_size, len(idx)), replace=False)
    return dict(tokens.batch(np.sort(chosen), rng))


def _observed_update(handle: Any, params: dict, batch: dict, cfg: Any, rng: np.random.Generator) -> dict:
    """One SGD step (lr 1) from ``params`` on ``batch``, as the server would see it under the run's
    privacy mechanism (the same clip and noise the run used)."""
    from fedfm.privacy import clip

    p = cfg.privacy
    handle.set_params(params)
    trainable = handle.trainable
    model = handle.model
    model.eval()
    gen = torch.Generator().manual_seed(int(rng.integers(2**31 - 1)))
    z = _noise_multiplier(cfg)
    if p.mechanism == "dpsgd":  # per-example clipped gradients plus noise, averaged over the batch
        n = int(batch["labels"].shape[0])
        total = {k: torch.zeros_like(v) for k, v in trainable.items()}
        for i in range(n):
            g = _grad(model, trainable, {k: v[i:i + 1] for k, v in batch.items()})
            g, _ = clip(g, p.clip)
            total = {k: total[k] + g[k] for k in total}
        grad = {k: (total[k] + z * p.clip * torch.randn(total[k].shape, generator=gen)) / n for k in total}
    else:
        grad = _grad(model, trainable, batch)
    update = {k: -g for k, g in grad.items()}
    if p.mechanism in ("central", "local"):
        update, _ = clip(update, p.clip)
    if p.mechanism == "local":
        update = {k: v + z * p.clip * torch.randn(v.shape, generator=gen) for k, v in update.items()}
    return update


def _grad(model: Any, trainable: dict, batch: dict) -> dict[str, torch.Tensor]:
    for v in trainable.values():
        v.grad = None
    model(**batch).loss.backward()
    out = {k: (v.grad.detach().clone() if v.grad is not None else torch.zeros_like(v)) for k, v in trainable.items()}
    for v in trainable.values():
        v.grad = None
    return out


def _noise_multiplier(cfg: Any) -> float:
    from fedfm.pipeline import noise_multiplier

    if cfg.privacy.mechanism == "none":
        return 0.0
    if cfg.privacy.mechanism == "dpsgd" and cfg.privacy.noise_multiplier is None:
        from fedfm.experiment import prepare_data

        return noise_multiplier(cfg, [len(i) for i in prepare_data(cfg).train])
    return noise_multiplier(cfg)


def _plain(x: Any) -> Any:
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, torch.Tensor):
        return x.tolist() if x.numel() < 64 else None
    if isinstance(x, (tuple, set)):
        return list(x)
    return str(x)


def format_report(report: dict[str, Any]) -> str:
    m, inv = report["membership"], report["inversion"]
    lines = [f"membership inference (loss threshold): AUC {m['auc']:.3f}, TPR@1%FPR {m['tpr_at_fpr']:.3f} "
             f"({m['num_members']} members vs {m['num_nonmembers']} non-members; 0.5 = no leak)",
             f"gradient inversion ({inv['kind']}; server sees {inv['observed']}, batch {inv['batch_size']}):"]
    if inv["kind"] == "image":
        lines.append(f"  PSNR {inv['psnr']:.1f} dB vs {inv['baseline_psnr']:.1f} dB for a random image; "
                     f"label accuracy {inv['label_accuracy']:.2f}")
    else:
        lines.append(f"  token F1 {inv['f1']:.3f} (precision {inv['precision']:.3f}, recall {inv['recall']:.3f}) "
                     f"vs {inv['baseline_f1']:.3f} for random tokens")
    return "\n".join(lines)
