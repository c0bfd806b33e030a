"""Personalized federated learning: part of the model stays with each client.

Every method splits the trainable parameters into *shared* ones (they travel, the server averages
them) and *personal* ones (kept in the client's state, where its runtime keeps client state, never
sent). The client loads the global shared values and its own personal values, trains, sends the
shared delta and keeps the personal values for its next round.

=============  ==========================================  ===============================================
method         personal                                     local training
=============  ==========================================  ===============================================
fedper         the task head                                 all trainable parameters together (Arivazhagan
                                                             et al. 2019, "Federated Learning with
                                                             Personalization Layers")
fedrep         the task head                                 ``head_steps`` steps of the head alone, then
                                                             the shared body with the head fixed (Collins
                                                             et al. 2021, "Exploiting Shared
                                                             Representations for Personalized FL")
ditto          a personal copy v of every trainable         the global model as in FedAvg, then
               parameter                                     ``personal_steps`` steps of v on
                                                             loss + lam/2 ||v - w||^2, w the received
                                                             global model (Li et al. 2021, "Ditto: Fair
                                                             and Robust FL Through Personalization")
personal-lora  a second LoRA adapter, "personal", beside    both adapters (and the head) together; the
               the shared one                                shared adapter and head travel
fedsa          lora_B of every LoRA pair                     everything together (FedSA-LoRA, Guo et al.
(adapter.      (A is shared)                                 2025: A learns what is general, B what is
aggregation)                                                 client-specific)
=============  ==========================================  ===============================================

Evaluation: each client's personalized model (global shared values + its personal values; a
client that never trained has the initial ones) on its own held-out data (``eval.per_client``,
forced on); the metrics line's ``accuracy``, ``loss`` and ``f1`` are those pooled over clients
(accuracy and loss weighted by examples, F1 the example-weighted mean of the clients' macro-F1).
In a deployment each client would compute its own; here the simulator does it from the client
states it keeps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional

import numpy as np
import torch

if TYPE_CHECKING:
    from fedfm.config import ExperimentConfig
    from fedfm.models.handle import ModelHandle
    from fedfm.trainers.local import LocalTrainer
    from fedfm.types import ClientTask, NamedTensors

PERSONAL = "personal_state"
"""ClientTask.payload key under which the runtime hands the trainer the client's personal values."""
PREFIX = "personal/"
"""Prefix of personal values in what a personalized trainer returns and in the client state."""


def _is_head(name: str) -> bool:
    from fedfm.adapters.base import HEAD_NAMES

    parts = name.split(".")
    return any(h in parts for h in HEAD_NAMES)


def _is_personal_adapter(name: str) -> bool:
    return ".personal." in name or name.endswith(".personal")


@dataclass
class Personalization:
    """Attributes:
        method: fedper | fedrep | ditto | personal-lora | fedsa.
        initial: the personal parameters' initial values (what a client that never trained holds).
        head_steps: fedrep: head-only steps before the body steps.
        lam: ditto: proximal weight.
        personal_steps: ditto: steps on the personal model per round (None = as many as the global).
    """

    method: str
    initial: dict[str, torch.Tensor] = field(default_factory=dict)
    head_steps: int = 5
    lam: float = 0.1
    personal_steps: Optional[int] = None

    def personal(self, name: str) -> bool:
        """Whether trainable parameter ``name`` stays on the client (never travels)."""
        if self.method in ("fedper", "fedrep"):
            return _is_head(name)
        if self.method == "personal-lora":
            return _is_personal_adapter(name)
        if self.method == "fedsa":
            from fedfm.adapters.lora_aggregation import lora_role

            return lora_role(name) == "B"
        return False  # ditto: every parameter is shared; the personal model is a separate copy

    def shared_names(self, handle: "ModelHandle") -> list[str]:
        return [n for n in handle.trainable if not self.personal(n)]

    def personal_names(self, handle: "ModelHandle") -> list[str]:
        return list(handle.trainable) if self.method == "ditto" else [n for n in handle.trainable if self.personal(n)]

    def values_of(self, task: "ClientTask") -> dict[str, torch.Tensor]:
        """The client's personal values (its state, or the initial ones before its first round)."""
        own = task.payload.get(PERSONAL) or {}
        return {k: own.get(k, v) for k, v in self.initial.items()}

    # ------------------------------------------------------------------ client training

    def train(self, trainer: "LocalTrainer", task: "ClientTask") -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """One round of local training; returns the shared params and ``personal/<name>`` values."""
        handle = trainer.handle
        mine = self.values_of(task)
        rng = np.random.default_rng(task.seed)
        torch.default_generator.manual_seed(task.seed)
        handle.set_params(task.params, partial=True)
        if self.method == "ditto":
            # 1. the global model, as FedAvg trains it; 2. the personal model, pulled toward the global
            losses, seen = trainer.fit(task, rng, list(handle.trainable))
            shared = {k: handle.trainable[k].detach().clone() for k in task.params}
            handle.set_params(mine, partial=True)
            anchor = dict(task.params)

            def prox(params: Mapping[str, torch.Tensor]) -> torch.Tensor:
                return 0.5 * self.lam * sum(((params[k] - anchor[k]) ** 2).sum() for k in anchor)  # type: ignore[return-value]

            p_losses, _ = trainer.fit(task, rng, list(handle.trainable), steps=self.personal_steps, extra_loss=prox,
                                      regularize=False)
            personal = {k: handle.trainable[k].detach().clone() for k in self.initial}
            metrics = _metrics(trainer, task, losses, seen)
            metrics["personal_loss"] = sum(p_losses) / len(p_losses) if p_losses else float("nan")
            return {**shared, **{PREFIX + k: v for k, v in personal.items()}}, metrics
        handle.set_params(mine, partial=True)
        if self.method == "fedrep":
            head = [n for n in handle.trainable if self.personal(n)]
            body = [n for n in handle.trainable if not self.personal(n)]
            h_losses, _ = trainer.fit(task, rng, head, steps=self.head_steps)
            losses, seen = trainer.fit(task, rng, body)
            metrics = _metrics(trainer, task, losses, seen)  # steps: the shared body's (SCAFFOLD, FedNova)
            metrics["head_steps"] = float(len(h_losses))
            out = {k: handle.trainable[k].detach().clone() for k in task.params}
            out.update({PREFIX + k: handle.trainable[k].detach().clone() for k in self.initial})
            return out, metrics
        else:  # fedper, personal-lora, fedsa: everything together
            losses, seen = trainer.fit(task, rng, list(handle.trainable))
        out = {k: handle.trainable[k].detach().clone() for k in task.params}
        out.update({PREFIX + k: handle.trainable[k].detach().clone() for k in self.initial})
        return out, _metrics(trainer, task, losses, seen)


def _metrics(trainer: "LocalTrainer", task: "ClientTask", losses: list, seen: int) -> dict[str, float]:
    n = len(trainer.client_indices[task.client_id])
    return {"train_loss": sum(losses) / len(losses) if losses else float("nan"), "steps": float(len(losses)),
            "num_examples": float(n), "examples_seen": float(seen)}


def build_personalization(cfg: "ExperimentConfig", handle: "ModelHandle") -> Optional[Personalization]:
    """The personalization of ``cfg`` (fedsa counts as one), with the initial personal values."""
    p = cfg.personalization
    method = "fedsa" if cfg.adapter.method == "lora" and cfg.adapter.aggregation == "fedsa" else p.method
    if method == "none":
        return None
    pers = Personalization(method=method, head_steps=p.head_steps, lam=p.lam, personal_steps=p.personal_steps)
    names = pers.personal_names(handle)
    if not names:
        from fedfm.errors import ConfigError

        raise ConfigError(f"personalization {method!r} finds no personal parameters in this model "
                          f"(trainable: {list(handle.trainable)[:4]}...); fedper/fedrep need a trained task head "
                          "(adapter.train_head = true), fedsa LoRA factors")
    pers.initial = {k: handle.trainable[k].detach().clone() for k in names}
    return pers


def add_personal_adapter(model: Any, rank: int, alpha: float, targets: list[str]) -> Any:
    """personal-lora: a second LoRA adapter named "personal" on the same modules, active (and
    trainable) together with the shared "default" one."""
    from peft import LoraConfig

    model.add_adapter("personal", LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets))
    model.base_model.set_adapter(["default", "personal"])
    return model


def evaluate_personal(handle: "ModelHandle", tokens: Any, local_test: list, states: Mapping[int, Any],
                      shared: "NamedTensors", pers: Personalization, batch_size: int,
                      read: Callable[[Any], Mapping[str, torch.Tensor]]) -> dict[str, Any]:
    """Each client's personalized model on its own held-out data, and the pooled metrics."""
    from fedfm.evaluate import evaluate

    handle.set_params(shared, partial=True)
    per, sizes, losses, f1s = [], [], [], []
    for c, idx in enumerate(local_test):
        if not len(idx):
            per.append(float("nan"))
            continue
        own = read(states.get(c)) if states is not None else {}
        handle.set_params({k: own.get(k, v) for k, v in pers.initial.items()}, partial=True)
        m = evaluate(handle, tokens, idx, batch_size)
        per.append(m["accuracy"])
        sizes.append(len(idx))
        losses.append(m["loss"])
        f1s.append(m["f1"])
    handle.set_params({**shared, **pers.initial}, partial=True)
    w = np.asarray(sizes, dtype=float) / max(sum(sizes), 1)
    acc = [a for a in per if a == a]
    pooled = float(np.dot(w, acc))
    return {"accuracy": pooled, "local_accuracy": pooled, "loss": float(np.dot(w, losses)), "f1": float(np.dot(w, f1s)),
            "client_accuracy": per, "client_accuracy_mean": float(np.mean(acc)) if acc else float("nan"),
            "client_accuracy_min": float(np.min(acc)) if acc else float("nan"), "personalized": True}
