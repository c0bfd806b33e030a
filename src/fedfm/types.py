"""Core payload and state types: what a round consumes and produces.

Everything that crosses the client/server boundary is one of these frozen
dataclasses. ``NamedTensors`` is the only tensor container that travels: an
ordered mapping from parameter name to tensor, holding exactly the trainable
(communicated) parameters and nothing of the frozen base model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:
    import torch

NamedTensors = Mapping[str, "torch.Tensor"]
"""Ordered name -> tensor mapping of communicated parameters (insertion order is the wire order)."""


@dataclass(frozen=True)
class ModelUpdate:
    """A client's contribution to one round.

    Attributes:
        delta: trained params minus the params the client received, per name.
        weight: aggregation weight (the example count unless the aggregator reweights).
        num_examples: examples the client trained on.
    """

    delta: NamedTensors
    weight: float
    num_examples: int


@dataclass(frozen=True)
class ClientTask:
    """What the server sends one client for one round.

    Attributes:
        round: 1-based round index.
        client_id: index of the client's partition.
        params: the global trainable parameters (the download).
        seed: the client's seed for this round (data order, dropout).
        payload: algorithm-specific extras (e.g. FedProx's mu), never tensors of the base model.
    """

    round: int
    client_id: int
    params: NamedTensors
    seed: int
    payload: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ClientResult:
    """What a client hands back.

    Attributes:
        client_id: the client's partition index.
        update: the dense update; None when the client failed, and until the server has decoded
            ``payload`` (runtimes hand back the payload, the round decodes it).
        metrics: scalar training metrics (train_loss, steps, num_examples, clipped, ...).
        bytes_up: serialized size of the payload as sent.
        bytes_down: serialized size of the task params as received.
        error: why the client produced no update, if it did not.
        payload: the update's wire payload as received (compressed, clipped, noised by the
            client's pipeline); see fedfm.pipeline.
    """

    client_id: int
    update: ModelUpdate | None
    metrics: Mapping[str, float]
    bytes_up: int
    bytes_down: int
    error: str | None = None
    payload: NamedTensors | None = None


@dataclass(frozen=True)
class ServerState:
    """The whole server state between rounds; a checkpoint is exactly this.

    Attributes:
        round: rounds completed so far (0 before training).
        params: global trainable parameters.
        opt_state: server-optimizer state (e.g. FedAdam moments), name -> tensor.
        extra: JSON-able server-side pipeline state (adaptive clip, privacy ledger counts; see
            fedfm.pipeline), checkpointed in state.json.
    """

    round: int
    params: NamedTensors
    opt_state: NamedTensors = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RoundReport:
    """Diagnostics of one round (one line of metrics.jsonl after evaluation is merged in)."""

    round: int
    clients: tuple[int, ...]
    train_loss: float
    bytes_up: int
    bytes_down: int
    rejected: tuple[Mapping[str, Any], ...] = ()
    wall_s: float = 0.0
    epsilon: float | None = None
    """Privacy spent so far at ``delta`` (None without a privacy mechanism; inf without noise)."""
    delta: float | None = None
    sim_time: float | None = None
    """Simulated seconds since the start of training (fedfm.federation), None when not simulated."""
    staleness: tuple[int, ...] = ()
    """async: staleness of each aggregated update (server versions since its client started)."""
