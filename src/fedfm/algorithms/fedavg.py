"""FedAvg (McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks
from Decentralized Data") with an optional server learning rate."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedfm.algorithms.base import ALGORITHMS, PlainClient

if TYPE_CHECKING:
    import torch

    from fedfm.config import AlgorithmConfig
    from fedfm.types import NamedTensors


@ALGORITHMS.register("fedavg")
@dataclass(frozen=True)
class FedAvg(PlainClient):
    """x <- x + server_lr * delta; server_lr = 1 is McMahan's FedAvg exactly."""

    server_lr: float = 1.0

    @classmethod
    def from_config(cls, cfg: "AlgorithmConfig") -> "FedAvg":
        return cls(server_lr=cls.server_lr if cfg.server_lr is None else cfg.server_lr)

    def init_state(self, params: "NamedTensors") -> "dict[str, torch.Tensor]":
        return {}

    def server_update(self, params, state, delta):  # type: ignore[no-untyped-def]
        return {k: params[k] + self.server_lr * delta[k] for k in params}, dict(state)
