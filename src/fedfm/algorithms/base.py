"""Algorithm extension point: a client objective hook plus a server update rule.

An algorithm never sees clients, runtimes or aggregators: the server hands it the
aggregated pseudo-gradient ``delta = weighted mean of (client params - global params)``
and its own state, and gets back new params and state (state in, state out).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Protocol, Sequence

from fedfm.registry import Registry

if TYPE_CHECKING:
    import torch

    from fedfm.config import AlgorithmConfig, ClientConfig
    from fedfm.types import ClientTask, ModelUpdate, NamedTensors


class Algorithm(Protocol):
    """What every federated optimization algorithm provides."""

    def init_state(self, params: "NamedTensors") -> "dict[str, torch.Tensor]":
        """Server optimizer state for the initial params (empty for stateless rules)."""
        ...

    def client_payload(self, state: "NamedTensors") -> Mapping[str, Any]:
        """What the client needs for its local objective, sent with each task: scalars, or a
        name -> tensor mapping (SCAFFOLD's server control variate; its bytes count as download).
        ``state`` is the server-optimizer state (``init_state``/``server_update``)."""
        ...

    def client_regularizer(
        self, params: "Mapping[str, torch.Tensor]", anchor: "NamedTensors", payload: Mapping[str, Any]
    ) -> "torch.Tensor | None":
        """Extra term added to the client's loss (None = plain local loss)."""
        ...

    def server_update(
        self, params: "NamedTensors", state: "NamedTensors", delta: "NamedTensors"
    ) -> "tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]":
        """Apply the aggregated pseudo-gradient; return (new params, new state)."""
        ...


ALGORITHMS: Registry[type] = Registry("algorithm")


class StatefulClients(Protocol):
    """Optional hooks of an algorithm whose clients keep state across rounds (SCAFFOLD's control
    variate) or whose server looks at each update before aggregation (FedNova's normalisation).

    The client's state lives where its runtime keeps client state (``client_states``, on disk past
    a memory budget; in a deployment on the client's device). The runtime hands it to the trainer
    as ``task.payload[CLIENT_STATE]`` and stores what ``client_finish`` returns.
    """

    def client_finish(self, task: "ClientTask", delta: "NamedTensors", metrics: Mapping[str, float]
                      ) -> "dict[str, torch.Tensor] | None":
        """The client's new state after training ``delta`` (None = keep none)."""
        ...

    def before_aggregate(self, updates: "list[ModelUpdate]", metrics: "Sequence[Mapping[str, float]]",
                         state: "NamedTensors", num_clients: int, uniform: bool
                         ) -> "tuple[list[ModelUpdate], dict[str, torch.Tensor]]":
        """Server side, per accepted update (with its client's training metrics): rescale updates
        and/or update the server state before the aggregator combines them. ``uniform`` is True
        when the aggregator weighs updates equally rather than by ``weight``."""
        ...


CLIENT_STATE = "client_state"
"""``ClientTask.payload`` key under which a client's runtime puts the client's own algorithm state
(never sent by the server)."""


def build_algorithm(cfg: "AlgorithmConfig", client: "ClientConfig | None" = None, num_clients: int = 1) -> Algorithm:
    """Instantiate the algorithm named by ``cfg.name`` from its config (``client``: the local
    optimizer settings, which SCAFFOLD and FedNova need; ``num_clients``: the population size)."""
    cls = ALGORITHMS.get(cfg.name)
    if getattr(cls, "needs_client_config", False):
        if client is None:
            from fedfm.config import ClientConfig

            client = ClientConfig()
        return cls.from_config(cfg, client, num_clients)  # type: ignore[attr-defined, no-any-return]
    return cls.from_config(cfg)  # type: ignore[attr-defined, no-any-return]


def has_client_state(algorithm: Any) -> bool:
    return callable(getattr(algorithm, "client_finish", None))


class PlainClient:
    """Mixin: the client minimizes its plain local loss and needs no payload."""

    def client_payload(self, state: Any = None) -> Mapping[str, Any]:
        return {}

    def client_regularizer(self, params: Any, anchor: Any, payload: Any) -> None:
        return None
