"""The plain local training loop: a client's data, its optimizer, its steps."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import torch

from fedfm.algorithms.base import Algorithm
from fedfm.config import ClientConfig
from fedfm.models.handle import ModelHandle
from fedfm.types import ClientTask


@dataclass
class LocalTrainer:
    """Trains the shared model in place for each task, one task at a time.

    Attributes:
        handle: the shared model; its trainable state is overwritten per task.
        data: the tokenized training pool.
        client_indices: client id -> indices into ``data``.
        cfg: local optimization settings.
        algorithm: supplies the client regularizer (e.g. FedProx).
    """

    handle: ModelHandle
    data: Any  # TokenizedTexts or LMTexts: anything with batch(idx, rng)
    client_indices: Mapping[int, np.ndarray]
    cfg: ClientConfig
    algorithm: Algorithm
    attack: Any = None
    """A simulated attack (fedfm.attacks.Attack) rewriting malicious clients' updates, or None.
    Applied here, before the update pipeline clips, noises and compresses it."""
    personal: Any = None
    """fedfm.personalization.Personalization when part of the model stays with each client: it
    runs the local training and returns the personal values beside the shared params."""
    pruning: Any = None
    """fedfm.adapters.ranks.SelfPruning: HetLoRA's tail regularizer and rank self-pruning."""
    max_rank: int = 0
    """The model's LoRA rank (with pruning)."""

    def train_many(self, tasks: Sequence[ClientTask]) -> list[tuple[dict[str, torch.Tensor], dict[str, float]]]:
        return [self.train(t) for t in tasks]

    def train(self, task: ClientTask) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """Load the task's params, run local steps, return (new params, metrics)."""
        rank = self._own_rank(task)
        if rank is not None:  # a lower-rank client starts (and stays) at zero past its rank
            from dataclasses import replace

            from fedfm.adapters.ranks import zero_tail_

            start = {k: v.clone() for k, v in task.params.items()}
            zero_tail_(start, rank)
            task = replace(task, params=start)
        if self.pruning is not None:
            return self._train_pruning(task, rank)
        if self.personal is not None:
            trained, metrics = self.personal.train(self, task)
        else:
            self.handle.set_params(task.params)
            # dropout masks; the only use of torch's global RNG. The CPU generator alone: torch.manual_seed
            # also seeds every accelerator backend, which costs milliseconds per call even without one.
            torch.default_generator.manual_seed(task.seed)
            rng = np.random.default_rng(task.seed)
            losses, seen = self.fit(task, rng, list(self.handle.trainable))
            n = len(self.client_indices[task.client_id])
            metrics = {"train_loss": sum(losses) / len(losses) if losses else float("nan"),
                       "steps": float(len(losses)), "num_examples": float(n), "examples_seen": float(seen)}
            trained = self.handle.get_params()
        shared = {k: trained[k] for k in task.params}
        kept = {k: v for k, v in trained.items() if k not in task.params}  # personal values (fedfm.personalization)
        return {**self._after_training(task, shared), **kept}, metrics

    def _own_rank(self, task: ClientTask) -> Optional[int]:
        """The LoRA rank this client trains at, when below the model's: the one the server assigns
        (``payload["lora_rank"]``), or lower if the client pruned itself (HetLoRA)."""
        rank = task.payload.get("lora_rank")
        if self.pruning is not None:
            from fedfm.adapters.ranks import OWN_RANK
            from fedfm.personalization import PERSONAL

            own = (task.payload.get(PERSONAL) or {}).get(OWN_RANK)
            if own is not None:
                rank = int(own) if rank is None else min(int(rank), int(own))
        return None if rank is None else int(rank)

    def _train_pruning(self, task: ClientTask, rank: Optional[int]) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """Local training with HetLoRA's tail regularizer, then its self-pruning step."""
        from fedfm.adapters.ranks import OWN_RANK, RANK, zero_tail_

        assert self.pruning is not None
        r = rank if rank is not None else self.max_rank
        self.handle.set_params(task.params)
        before = self.pruning.tail_norm(task.params, r)
        torch.default_generator.manual_seed(task.seed)
        rng = np.random.default_rng(task.seed)
        losses, seen = self.fit(task, rng, list(self.handle.trainable),
                                extra_loss=lambda p: self.pruning.regularizer(p, r))  # type: ignore[union-attr]
        trained = self.handle.get_params()
        new = self.pruning.new_rank(before, self.pruning.tail_norm(trained, r), r)
        if new < r:
            zero_tail_(trained, new)
        n = len(self.client_indices[task.client_id])
        metrics = {"train_loss": sum(losses) / len(losses) if losses else float("nan"), "steps": float(len(losses)),
                   "num_examples": float(n), "examples_seen": float(seen), RANK: float(new)}
        out = {k: trained[k] for k in task.params}
        return {**self._after_training(task, out), "personal/" + OWN_RANK: torch.tensor(new)}, metrics

    def fit(self, task: ClientTask, rng: np.random.Generator, names: Sequence[str], steps: Optional[int] = None,
            extra_loss: Optional[Callable[[Mapping[str, torch.Tensor]], torch.Tensor]] = None,
            regularize: bool = True) -> tuple[list[float], int]:
        """Local steps on the client's data updating the trainable parameters ``names`` (the others
        held fixed), from the model's current values; returns (losses, examples seen). ``steps``:
        exactly this many steps (as many epochs as it takes) instead of client.epochs/max_steps;
        ``extra_loss`` is added to the loss (Ditto's proximal term); ``regularize`` adds the
        algorithm's client regularizer (FedProx, SCAFFOLD). A deadline's cap applies either way."""
        params = self.handle.trainable
        train = {k: params[k] for k in names}
        fixed = [p for k, p in params.items() if k not in train]
        for p in fixed:
            p.requires_grad_(False)
        if not self.handle.model.training:  # evaluate() restores the mode it found; this walks every module
            self.handle.model.train()
        model, optimizer, release = self._prepare(task, list(train.values()))
        losses, seen = [], 0
        try:
            for batch_idx in self._batches(self.client_indices[task.client_id], rng, task.payload.get("max_steps"),
                                           steps):
                seen += len(batch_idx)
                loss = model(**self.data.batch(batch_idx, rng)).loss
                reg = self.algorithm.client_regularizer(params, task.params, task.payload) if regularize else None
                if reg is not None:
                    loss = loss + reg
                if extra_loss is not None:
                    loss = loss + extra_loss(params)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if self.cfg.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(train.values(), self.cfg.grad_clip)
                optimizer.step()
                losses.append(float(loss.detach()))
        finally:
            release()
            for p in fixed:
                p.requires_grad_(True)
        return losses, seen

    def _after_training(self, task: ClientTask, trained: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The trained params as the client hands them on: a simulated malicious client rewrites
        its update here (before the update pipeline clips, noises and compresses it)."""
        if self.attack is None or task.client_id not in self.attack.malicious:
            return trained
        from fedfm.tensors import sub

        gen = torch.Generator().manual_seed(task.seed ^ 0xA77AC)
        delta = self.attack.apply_update(task.client_id, sub(trained, task.params), gen)
        return {k: task.params[k] + delta[k].to(task.params[k].dtype) for k in task.params}

    def _prepare(self, task: ClientTask, params: list[torch.nn.Parameter]) -> tuple[Any, Any, Any]:
        """(the module to call, the optimizer, a cleanup to run after the loop); subclasses such
        as the DP-SGD trainer wrap the model and the optimizer here."""
        return self.handle.model, make_optimizer(self.cfg, params), lambda: None

    def _batches(self, idx: np.ndarray, rng: np.random.Generator, cap: Any = None, exact: Optional[int] = None) -> Any:
        """Batches of local training: ``cfg.epochs`` epochs, at most ``cfg.max_steps`` steps (or
        exactly ``exact`` steps over as many epochs as needed), and at most ``cap`` (this round's
        ``task.payload["max_steps"]``: a straggler's partial work)."""
        steps = 0
        bs = self.cfg.batch_size
        limit, epochs = (self.cfg.max_steps, self.cfg.epochs) if exact is None else (exact, 10**9)
        if cap is not None:
            limit = int(cap) if limit is None else min(int(cap), limit)
        if len(idx) == 0:
            return
        for _ in range(epochs):
            perm = rng.permutation(idx)
            for start in range(0, len(perm), bs):
                if limit is not None and steps >= limit:
                    return
                yield perm[start : start + bs]
                steps += 1


def make_optimizer(cfg: ClientConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
