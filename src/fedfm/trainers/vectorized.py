"""Vectorised clients: a whole cohort's local training in one batched call.

Each local step of every client in the cohort runs as ONE forward and backward pass:
``torch.func.vmap`` maps ``torch.func.functional_call`` of the shared model over the clients'
stacked trainable parameters and their stacked batches, while the frozen base weights stay a
single shared copy (vmap broadcasts them). The optimizer then steps the stacked tensors at once:
SGD (with momentum and weight decay), Adam and AdamW act coordinate by coordinate, so one torch
optimizer over ``(clients, *shape)`` tensors is exactly one optimizer per client.

What is the same as the sequential trainer (fedfm.trainers.local.LocalTrainer):
- each client's batches: drawn by the same per-client generator, in the same order, so every
  client sees exactly the examples it would see alone;
- the loss (the model's own loss, plus the algorithm's regularizer, e.g. FedProx), gradient
  clipping per client (torch's ``clip_grad_norm_`` formula), optimizer arithmetic, the attack
  hook, and the metrics;
- clients with fewer steps stop early: their parameters are taken when their last step is done.
What differs, within float tolerance (tests: 1e-5 relative on a tiny BERT): batches are padded to
a common shape across clients (padding examples carry the ignore label -100 and padded tokens an
attention mask of 0), attention uses the eager kernel with an explicit 4-D mask (the fused
kernel has no batching rule on CPU and transformers' mask shortcut inspects data, which vmap
cannot), and sums run in a different order. Dropout draws different random numbers than the
sequential run (``randomness="different"``: each client gets its own masks), so with dropout
on, the two agree in distribution, not bit for bit.

When it pays: many clients whose per-client kernels are too small to keep the cores busy
(e.g. an MLP or a small adapter), where the sequential loop is Python-bound. For a model whose
single-client matmuls already fill the CPU, vectorising gains little and costs memory (every
client's trainable copy, gradient and optimizer state at once); ``runtime.vectorize = "auto"``
applies the rule in :func:`should_vectorize`.

When it cannot apply, it falls back to the sequential loop with a logged reason: a trainer that
needs per-example hooks (DP-SGD via Opacus subclasses LocalTrainer, not this class), a cohort of
one, or a model whose forward pass vmap rejects (data-dependent control flow).

Written by hand: torch.func provides vmap and functional_call; batching the cohort's steps,
padding, and the per-client optimizer bookkeeping around them is fedfm's own.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch

from fedfm.trainers.local import LocalTrainer, make_optimizer
from fedfm.types import ClientTask

log = logging.getLogger("fedfm.vectorized")

MEMORY_BUDGET = 2 * 1024**3
"""Bytes of stacked trainable state (params, grads, two optimizer moments) one batched call may
hold; larger cohorts are split into chunks of clients."""

AUTO_MAX_PARAMS = 2_000_000
"""``vectorize = "auto"`` vectorises models with at most this many parameters in all (frozen
included): above it one client's matmuls already keep a CPU core busy (measured in
benchmarks/overhead.py)."""

_PAD_VALUES = {"input_ids": 0, "attention_mask": 0, "token_type_ids": 0, "labels": -100}


def should_vectorize(setting: Any, model: torch.nn.Module, trainer: LocalTrainer, clients_per_round: int
                     ) -> tuple[bool, str]:
    """(vectorise?, why) for ``runtime.vectorize`` = True | False | "auto"."""
    if setting is False:
        return False, "runtime.vectorize = false"
    blocker = _blocker(trainer, clients_per_round)
    if blocker is not None:
        return False, blocker
    if setting is True:
        return True, "runtime.vectorize = true"
    total = sum(p.numel() for p in model.parameters())
    if total > AUTO_MAX_PARAMS:
        return False, f"auto: the model has {total:,} parameters (> {AUTO_MAX_PARAMS:,}); sequential is as fast"
    return True, f"auto: {total:,} parameters and {clients_per_round} clients per round"


def _blocker(trainer: LocalTrainer, clients_per_round: int) -> Optional[str]:
    if type(trainer) is not LocalTrainer:
        return (f"{type(trainer).__name__} hooks into each client's model (per-example gradients) and "
                "cannot be batched across clients")
    if clients_per_round < 2:
        return "one client per round: nothing to batch"
    from fedfm.algorithms.base import has_client_state

    if trainer.pruning is not None:
        return "HetLoRA's self-pruning decides each client's rank after its own training, one client at a time"
    if trainer.personal is not None:
        return (f"personalization {trainer.personal.method!r} trains personal parameters per client, which one "
                "batched call does not carry")
    if has_client_state(trainer.algorithm):
        return (f"{type(trainer.algorithm).__name__} corrects each client's steps with the client's own state "
                "(a per-client payload), which one batched call does not carry")
    return None


@dataclass
class VectorizedTrainer(LocalTrainer):
    """LocalTrainer whose ``train_many`` trains the given clients together (see the module doc).

    Attributes:
        memory_budget: bytes of stacked trainable state per batched call (cohorts are chunked).
        fallback_reason: set when vectorising failed once; every later call is sequential.
    """

    memory_budget: int = MEMORY_BUDGET
    fallback_reason: Optional[str] = field(default=None, init=False)

    def train_many(self, tasks: Sequence[ClientTask]) -> list[tuple[dict[str, torch.Tensor], dict[str, float]]]:
        if len(tasks) < 2 or self.fallback_reason is not None:
            return [self.train(t) for t in tasks]
        per_client = 4 * sum(p.numel() * p.element_size() for p in self.handle.trainable.values())
        chunk = max(1, int(self.memory_budget // max(per_client, 1)))
        out: list[tuple[dict[str, torch.Tensor], dict[str, float]]] = []
        for start in range(0, len(tasks), chunk):
            part = tasks[start:start + chunk]
            if len(part) < 2 or self.fallback_reason is not None:
                out += [self.train(t) for t in part]
                continue
            try:
                out += self._train_together(part)
            except _CannotVectorize as e:
                self.fallback_reason = str(e)
                log.warning("vectorised clients disabled, training sequentially: %s", e)
                out += [self.train(t) for t in part]
        return out

    def _train_together(self, tasks: Sequence[ClientTask]) -> list[tuple[dict[str, torch.Tensor], dict[str, float]]]:
        from torch.func import functional_call, vmap

        model = self.handle.model
        names = list(self.handle.trainable)
        stacked = {k: torch.stack([_start(t, k) for t in tasks]).to(self.handle.trainable[k].dtype)
                   .requires_grad_(True) for k in names}
        anchors = {k: torch.stack([_start(t, k) for t in tasks]) for k in names}
        payload = tasks[0].payload
        optimizer = make_optimizer(self.cfg, list(stacked.values()))
        streams = [self._client_stream(t) for t in tasks]
        n = len(tasks)
        losses: list[list[float]] = [[] for _ in range(n)]
        seen = [0] * n
        final: list[Optional[dict[str, torch.Tensor]]] = [None] * n
        causal = bool(getattr(getattr(model, "config", None), "is_decoder", False)) or _is_causal(model)
        algorithm = self.algorithm

        def client_loss(p: dict, anchor: dict, batch: dict) -> torch.Tensor:
            inputs = dict(batch)
            if "attention_mask" in inputs:
                inputs["attention_mask"] = _additive_mask(inputs["attention_mask"], causal)
            loss = functional_call(model, p, args=(), kwargs=inputs).loss
            reg = algorithm.client_regularizer(p, anchor, payload)
            return loss if reg is None else loss + reg

        batched = vmap(client_loss, randomness="different")
        torch.default_generator.manual_seed(tasks[0].seed)  # dropout masks (drawn per client inside vmap)
        model.train()
        with _eager_attention(model):
            while True:
                step = [next(s, None) for s in streams]
                active = [b is not None for b in step]
                for c in range(n):
                    if not active[c] and final[c] is None:
                        final[c] = {k: stacked[k][c].detach().clone() for k in names}
                if not any(active):
                    break
                filler = next(b for b in step if b is not None)
                batch = _stack_padded([b[1] if b is not None else filler[1] for b in step])
                try:
                    per_client = batched(stacked, anchors, batch)
                except RuntimeError as e:
                    if "vmap" in str(e) and not any(losses):
                        raise _CannotVectorize(f"the model's forward pass cannot be vmapped: {str(e)[:200]}") from None
                    raise
                optimizer.zero_grad(set_to_none=True)
                per_client.sum().backward()
                if self.cfg.grad_clip is not None:
                    _clip_per_client(list(stacked.values()), self.cfg.grad_clip)
                optimizer.step()
                values = per_client.detach().tolist()
                for c in range(n):
                    if active[c]:
                        losses[c].append(float(values[c]))
                        seen[c] += len(step[c][0])  # type: ignore[index]
        out = []
        for c, task in enumerate(tasks):
            count = len(self.client_indices[task.client_id])
            metrics = {"train_loss": float(np.mean(losses[c])) if losses[c] else float("nan"),
                       "steps": float(len(losses[c])), "num_examples": float(count),
                       "examples_seen": float(seen[c])}
            trained = final[c] if final[c] is not None else {k: stacked[k][c].detach().clone() for k in names}
            out.append((self._after_training(task, trained), metrics))  # type: ignore[arg-type]
        return out

    def _client_stream(self, task: ClientTask) -> Iterator[tuple[np.ndarray, dict[str, torch.Tensor]]]:
        """(indices, batch) per local step, drawn exactly as LocalTrainer.train draws them."""
        rng = np.random.default_rng(task.seed)
        for idx in self._batches(self.client_indices[task.client_id], rng, task.payload.get("max_steps")):
            yield idx, self.data.batch(idx, rng)


def _start(task: ClientTask, name: str) -> torch.Tensor:
    """A client's starting value of ``name``: the download, with LoRA components past a lower-rank
    client's rank at zero (fedfm.adapters.ranks)."""
    v = task.params[name]
    rank = task.payload.get("lora_rank")
    if rank is None:
        return v
    from fedfm.adapters.ranks import zero_tail_

    v = v.clone()
    zero_tail_({name: v}, int(rank))
    return v


class _CannotVectorize(Exception):
    pass


def _is_causal(model: torch.nn.Module) -> bool:
    cfg = getattr(model, "config", None)
    arch = " ".join(getattr(cfg, "architectures", None) or []) + type(model).__name__
    return "CausalLM" in arch


def _additive_mask(mask: torch.Tensor, causal: bool) -> torch.Tensor:
    """(batch, seq) 0/1 padding mask -> (batch, 1, seq, seq) float mask: 0 where attending, the
    dtype's minimum elsewhere (what transformers builds itself outside vmap)."""
    seq = mask.shape[-1]
    allowed = mask[:, None, None, :].bool().expand(mask.shape[0], 1, seq, seq)
    if causal:
        allowed = allowed & torch.ones(seq, seq, dtype=torch.bool).tril()
    zero = torch.zeros((), dtype=torch.float32)
    return torch.where(allowed, zero, torch.finfo(torch.float32).min)


class _eager_attention:
    """Use transformers' eager attention for the duration (restored after): its matmuls batch
    under vmap, where the fused CPU kernel falls back to a per-example loop."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.configs = [m.config for m in model.modules() if hasattr(getattr(m, "config", None), "_attn_implementation")]
        self.saved: list[Any] = []

    def __enter__(self) -> None:
        for c in self.configs:
            self.saved.append(c._attn_implementation)
            c._attn_implementation = "eager"

    def __exit__(self, *exc: Any) -> None:
        for c, v in zip(self.configs, self.saved):
            c._attn_implementation = v


def _stack_padded(batches: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack per-client batches to (clients, batch, ...) tensors, padding every dimension to the
    largest: extra examples get label -100 (ignored by the loss) and one attended token, extra
    token positions get mask 0."""
    out = {}
    rows = max(int(b[next(iter(b))].shape[0]) for b in batches)
    for key in batches[0]:
        tensors = [b[key] for b in batches]
        shape = [max(int(t.shape[d]) for t in tensors) for d in range(tensors[0].dim())]
        shape[0] = rows
        fill = _PAD_VALUES.get(key, 0)
        padded = torch.full((len(tensors), *shape), fill, dtype=tensors[0].dtype)
        for i, t in enumerate(tensors):
            padded[(i, *[slice(0, s) for s in t.shape])] = t
            if key == "attention_mask" and t.shape[0] < rows:
                padded[i, t.shape[0]:, 0] = 1  # a padding example attends to one token: no empty softmax
        out[key] = padded
    return out


def _clip_per_client(stacked: list[torch.Tensor], max_norm: float) -> None:
    """Each client's gradient scaled as ``torch.nn.utils.clip_grad_norm_`` would scale it alone."""
    grads = [p.grad for p in stacked if p.grad is not None]
    if not grads:
        return
    sq = sum(g.reshape(g.shape[0], -1).double().pow(2).sum(1) for g in grads)
    coef = (max_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.to(g.dtype).reshape(-1, *([1] * (g.dim() - 1))))
