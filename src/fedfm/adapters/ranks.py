"""Heterogeneous LoRA ranks, simulated on one shared peft model.

The model is built at the largest rank r_max. A client of rank r < r_max:

* receives the first r components of every LoRA pair (A[:r], B[:, :r]; HetLoRA's truncation,
  and FlexLoRA's, whose global factors are ordered by singular value);
* trains with the other components held at zero: with A[r:] = 0 and B[:, r:] = 0 their gradients
  are zero too (dL/dB[:, j] is proportional to A[j] x, dL/dA[j] to B[:, j]), and AdamW, Adam and
  SGD leave a zero parameter with a zero gradient at zero, so the client's product is exactly a
  rank-r LoRA product;
* sends only those r components of its update; the server pads the rest back. The padded delta's
  tail is minus the global tail: the client's factors zero-padded to r_max, which is what HetLoRA
  aggregates and what leaves B_i @ A_i unchanged (FlexLoRA).

Every client uses peft's one scaling alpha / r_max, so zero-padding and truncation are exact for
the applied delta (HetLoRA's paper uses alpha / r_i per client; with one scaling, a client's first
r components mean the same thing on every client).

Bytes are those of the truncated tensors, down and up. Written by hand: peft has no notion of a
per-client rank inside one model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

import torch

from fedfm.adapters.lora_aggregation import lora_role

if TYPE_CHECKING:
    from fedfm.config import ExperimentConfig

NamedTensors = Mapping[str, torch.Tensor]

RANK = "lora_rank"
"""ClientTask.payload key: the client's LoRA rank when below the model's; also the metrics key
under which a self-pruning (HetLoRA) client reports the rank it trained and sends."""
OWN_RANK = "__lora_rank__"
"""Key, among a client's kept values, of the rank a HetLoRA client has pruned itself down to."""


@dataclass(frozen=True)
class SelfPruning:
    """HetLoRA's rank self-pruning (Cho et al. 2024), on the client:

    * local loss + lam * ||B_t @ A_t||_F summed over the LoRA modules, where the tail t is the
      components k..r-1 with k = max(floor(gamma * r), min_rank): the regularizer pushes the
      trailing components toward zero;
    * after local training, if the tail's update norm (over all modules) is below what it was on
      the factors the client started from, the client drops the tail: its rank becomes k, kept
      in its state for the next rounds, never below min_rank. It trains, sends and receives at
      that rank from then on (the server pads by the rank the client reports).

    The math is ``hetlora_regularizer`` / ``hetlora_tail_norm`` / ``hetlora_tail_start`` in
    fedfm.adapters.lora_aggregation."""

    lam: float = 0.01
    gamma: float = 0.99
    min_rank: int = 1

    def regularizer(self, params: Mapping[str, torch.Tensor], rank: int) -> torch.Tensor:
        from fedfm.adapters.lora_aggregation import group_lora, hetlora_regularizer

        total = None
        for f in group_lora(params).factors.values():
            term = hetlora_regularizer(f.A[:rank], f.B[:, :rank], self.gamma, self.min_rank)
            total = term if total is None else total + term
        return self.lam * total if total is not None else torch.zeros(())

    def tail_norm(self, params: Mapping[str, torch.Tensor], rank: int) -> float:
        from fedfm.adapters.lora_aggregation import group_lora, hetlora_tail_norm

        return float(sum(hetlora_tail_norm(f.A[:rank], f.B[:, :rank], self.gamma, self.min_rank) ** 2
                         for f in group_lora(params).factors.values()) ** 0.5)

    def new_rank(self, before: float, after: float, rank: int) -> int:
        from fedfm.adapters.lora_aggregation import hetlora_tail_start

        k = hetlora_tail_start(rank, self.gamma, self.min_rank)
        return k if k < rank and after < before else rank


def client_ranks(cfg: "ExperimentConfig") -> Optional[list[int]]:
    """Each client's LoRA rank, or None when every client has the model's rank."""
    a = cfg.adapter
    if a.method != "lora" or not a.heterogeneous:
        return None
    if a.rank == "tiers":
        from fedfm.system import assign_tiers

        tiers = cfg.clients.tiers
        idx = assign_tiers(cfg.federation.clients, [t.share for t in tiers], cfg.seed)
        return [int(tiers[int(k)].rank) for k in idx]  # type: ignore[arg-type]
    return [int(r) for r in a.rank]  # type: ignore[union-attr]


def _slice(name: str, t: torch.Tensor, r: int) -> torch.Tensor:
    role = lora_role(name)
    if role == "A":
        return t[:r]
    if role == "B":
        return t[:, :r]
    return t


def truncate(params: NamedTensors, rank: int) -> dict[str, torch.Tensor]:
    """The first ``rank`` components of every LoRA factor (views); other tensors as they are."""
    return {k: _slice(k, v, rank) for k, v in params.items()}


def pad_delta(delta: NamedTensors, params: NamedTensors, rank: int) -> dict[str, torch.Tensor]:
    """A rank-``rank`` client's truncated update -> the full-rank update against ``params``: the
    components the client does not hold go to zero (their delta is minus the global value)."""
    out = {}
    for k, g in params.items():
        d = delta[k]
        role = lora_role(k)
        if role == "A" and d.shape[0] < g.shape[0]:
            d = torch.cat([d, -g[d.shape[0]:]], dim=0)
        elif role == "B" and d.shape[1] < g.shape[1]:
            d = torch.cat([d, -g[:, d.shape[1]:]], dim=1)
        out[k] = d
    return out


@torch.no_grad()
def zero_tail_(params: Mapping[str, torch.Tensor], rank: int) -> None:
    """Hold every LoRA component past ``rank`` at zero, in place (the live model's parameters)."""
    for k, p in params.items():
        role = lora_role(k)
        if role == "A":
            p[rank:].zero_()
        elif role == "B":
            p[:, rank:].zero_()


def check_rank_fits(handle: Any, rank: int, method: str) -> None:
    """FlexLoRA redistributes a truncated SVD of each layer's mean delta: the rank cannot exceed
    min(out, in) of any wrapped layer.

    Raises:
        ConfigError: naming the layer, its shape and the rank.
    """
    from fedfm.errors import ConfigError

    for name, p in handle.trainable.items():
        if lora_role(name) == "A":
            inp = p.shape[1]
            b = handle.trainable.get(name.replace("lora_A", "lora_B"))
            out = b.shape[0] if b is not None else inp
            if rank > min(out, inp):
                raise ConfigError(f"adapter.aggregation={method!r}: a FlexLoRA rank above the layer's size: rank "
                                  f"{rank} > min(out, in) = {min(out, inp)} for {name.rsplit('.lora_A', 1)[0]} "
                                  f"(out={out}, in={inp}); lower adapter.rank")


def combine(strategy: Any, params: NamedTensors, updates: Sequence[Any], uniform: bool, *,
            scaling: float = 1.0, generator: Optional[torch.Generator] = None,
            ranks: Optional[Sequence[int]] = None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], int]:
    """One round of a LoRA-aware strategy (hetlora, flexlora, flora) as a pseudo-gradient: the
    clients' trained params (global + delta, full rank, zero-padded) combined by ``strategy``, minus
    the global params, so any server optimizer applies it (FedAvg with server_lr 1: the new params).

    Returns (pseudo-gradient, merge_into_base, stack_bytes): FLoRA's per-module (out x in) deltas
    for the frozen base weights (``scaling`` = peft's alpha / r is applied, as the model applies it)
    and the encoded size of the stacked factors every client must download to merge them too
    (0 for the other strategies)."""
    from fedfm import wire
    from fedfm.adapters.lora_aggregation import LoraRound, group_lora

    clients = [{k: params[k] + u.delta[k] for k in params} for u in updates]
    weights = None if uniform else [float(u.weight) for u in updates]
    flora = getattr(strategy, "name", "") == "flora"
    out = strategy.aggregate(LoraRound(global_params=params, client_params=clients, weights=weights,
                                       scalings=[scaling] * len(clients) if flora else None, generator=generator))
    stack_bytes = 0
    if flora:  # the stack [A_1; ...; A_n], [p_1 s B_1, ..., p_n s B_n] at the clients' real ranks
        glob = group_lora(params)
        total = sum(ranks) if ranks is not None else len(clients) * max(f.rank for f in glob.factors.values())
        stacks = {}
        for m in out.merge_into_base:
            A, B = glob.factors[m]
            stacks[f"{m}.A"] = torch.empty((total, A.shape[1]), dtype=A.dtype, device="meta")
            stacks[f"{m}.B"] = torch.empty((B.shape[0], total), dtype=B.dtype, device="meta")
        stack_bytes = wire.encoded_size(stacks)
    return {k: out.params[k] - params[k] for k in params}, dict(out.merge_into_base), stack_bytes


MERGED = "flora_merged/"
"""opt_state prefix of FLoRA's accumulated base-weight deltas, per LoRA module (so a checkpoint
restores the merged base model)."""


@dataclass
class BaseMerger:
    """Sets each LoRA module's frozen base weight to W0 + M, with W0 the weight before any merge
    (kept on first use) and M FLoRA's accumulated merge: the same sum whether a run went straight
    through or resumed from a checkpoint holding M, bit for bit. In place: forked workers share
    the storage (fedfm.runtime.multiprocess)."""

    model: Any
    originals: dict[str, torch.Tensor] = field(default_factory=dict)

    @torch.no_grad()
    def __call__(self, merged: Mapping[str, torch.Tensor]) -> None:
        for module, delta in merged.items():
            layer = self.model.get_submodule(module)
            w = getattr(layer, "base_layer", layer).weight
            if module not in self.originals:
                self.originals[module] = w.detach().clone()
            d = delta.to(w.dtype)
            if getattr(layer, "fan_in_fan_out", False):
                d = d.T
            w.copy_(self.originals[module] + d)
