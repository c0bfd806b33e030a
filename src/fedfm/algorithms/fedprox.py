"""FedProx (Li et al. 2020, "Federated Optimization in Heterogeneous Networks").

The client minimizes ``loss + mu/2 * ||w - w_global||^2`` over the trainable
(communicated) parameters; the server step is FedAvg's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

from fedfm.algorithms.base import ALGORITHMS
from fedfm.algorithms.fedavg import FedAvg

if TYPE_CHECKING:
    import torch

    from fedfm.config import AlgorithmConfig
    from fedfm.types import NamedTensors


@ALGORITHMS.register("fedprox")
@dataclass(frozen=True)
class FedProx(FedAvg):
    mu: float = 0.01

    @classmethod
    def from_config(cls, cfg: "AlgorithmConfig") -> "FedProx":
        return cls(server_lr=cls.server_lr if cfg.server_lr is None else cfg.server_lr, mu=cfg.mu)

    def client_payload(self, state: Any = None) -> Mapping[str, Any]:
        return {"mu": self.mu}

    def client_regularizer(
        self, params: "Mapping[str, torch.Tensor]", anchor: "NamedTensors", payload: Mapping[str, Any]
    ) -> "torch.Tensor | None":
        mu = float(payload["mu"])
        if mu == 0.0:
            return None
        sq = sum(((params[k] - anchor[k]) ** 2).sum() for k in anchor)
        return 0.5 * mu * sq  # type: ignore[return-value]
