"""Algorithm extension point: a client objective hook plus a server update rule.

An algorithm never sees clients, runtimes or aggregators: the server hands it the
aggregated pseudo-gradient ``delta = weighted mean of (client params - global params)``
and its own state, and gets back new params and state (state in, state out).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Protocol

from fedfm.registry import Registry

if TYPE_CHECKING:
    import torch

    from fedfm.config import AlgorithmConfig
    from fedfm.types import NamedTensors


class Algorithm(Protocol):
    """What every federated optimization algorithm provides."""

    def init_state(self, params: "NamedTensors") -> "dict[str, torch.Tensor]":
        """Server optimizer state for the initial params (empty for stateless rules)."""
        ...

    def client_payload(self) -> Mapping[str, Any]:
        """Scalars the client needs for its local objective (sent with each task)."""
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


def build_algorithm(cfg: "AlgorithmConfig") -> Algorithm:
    """Instantiate the algorithm named by ``cfg.name`` from its config."""
    return ALGORITHMS.get(cfg.name).from_config(cfg)  # type: ignore[attr-defined, no-any-return]


class PlainClient:
    """Mixin: the client minimizes its plain local loss and needs no payload."""

    def client_payload(self) -> Mapping[str, Any]:
        return {}

    def client_regularizer(self, params: Any, anchor: Any, payload: Any) -> None:
        return None
