"""Server-side adaptive optimization on the pseudo-gradient.

FedAvgM: Hsu et al. 2019, "Measuring the Effects of Non-Identical Data Distribution".
FedAdagrad, FedAdam, FedYogi: Reddi et al. 2021, "Adaptive Federated Optimization",
Algorithm 2. With delta the aggregated pseudo-gradient:

    m <- beta1 * m + (1 - beta1) * delta
    v <- v + delta^2                                   (FedAdagrad)
    v <- beta2 * v + (1 - beta2) * delta^2             (FedAdam)
    v <- v - (1 - beta2) * delta^2 * sign(v - delta^2) (FedYogi)
    x <- x + server_lr * m / (sqrt(v) + tau)

As in the paper, v starts at tau^2 (its v_{-1} >= tau^2) and m at 0; no bias correction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedfm.algorithms.base import ALGORITHMS, PlainClient

if TYPE_CHECKING:
    import torch

    from fedfm.config import AlgorithmConfig
    from fedfm.types import NamedTensors


@ALGORITHMS.register("fedavgm")
@dataclass(frozen=True)
class FedAvgM(PlainClient):
    """v <- momentum * v + delta; x <- x + server_lr * v."""

    server_lr: float = 1.0
    momentum: float = 0.9

    @classmethod
    def from_config(cls, cfg: "AlgorithmConfig") -> "FedAvgM":
        return cls(server_lr=cls.server_lr if cfg.server_lr is None else cfg.server_lr, momentum=cfg.momentum)

    def init_state(self, params: "NamedTensors") -> "dict[str, torch.Tensor]":
        import torch

        return {f"v/{k}": torch.zeros_like(p) for k, p in params.items()}

    def server_update(self, params, state, delta):  # type: ignore[no-untyped-def]
        new_state = {f"v/{k}": self.momentum * state[f"v/{k}"] + delta[k] for k in params}
        new_params = {k: params[k] + self.server_lr * new_state[f"v/{k}"] for k in params}
        return new_params, new_state


@dataclass(frozen=True)
class _AdaptiveServer(PlainClient):
    server_lr: float = 1e-2
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

    @classmethod
    def from_config(cls, cfg: "AlgorithmConfig") -> "_AdaptiveServer":
        return cls(server_lr=cls.server_lr if cfg.server_lr is None else cfg.server_lr, beta1=cfg.beta1, beta2=cfg.beta2, tau=cfg.tau)

    def init_state(self, params: "NamedTensors") -> "dict[str, torch.Tensor]":
        import torch

        state = {f"m/{k}": torch.zeros_like(p) for k, p in params.items()}
        state.update({f"v/{k}": torch.full_like(p, self.tau**2) for k, p in params.items()})
        return state

    def second_moment(self, v: "torch.Tensor", d2: "torch.Tensor") -> "torch.Tensor":
        raise NotImplementedError  # each subclass is one rule of Reddi et al., Algorithm 2

    def server_update(self, params, state, delta):  # type: ignore[no-untyped-def]
        new_params, new_state = {}, {}
        for k, x in params.items():
            d = delta[k]
            m = self.beta1 * state[f"m/{k}"] + (1 - self.beta1) * d
            v = self.second_moment(state[f"v/{k}"], d * d)
            new_state[f"m/{k}"], new_state[f"v/{k}"] = m, v
            new_params[k] = x + self.server_lr * m / (v.sqrt() + self.tau)
        return new_params, new_state


@ALGORITHMS.register("fedadagrad")
class FedAdagrad(_AdaptiveServer):
    def second_moment(self, v, d2):  # type: ignore[no-untyped-def]
        return v + d2


@ALGORITHMS.register("fedadam")
class FedAdam(_AdaptiveServer):
    def second_moment(self, v, d2):  # type: ignore[no-untyped-def]
        return self.beta2 * v + (1 - self.beta2) * d2


@ALGORITHMS.register("fedyogi")
class FedYogi(_AdaptiveServer):
    def second_moment(self, v, d2):  # type: ignore[no-untyped-def]
        import torch

        return v - (1 - self.beta2) * d2 * torch.sign(v - d2)
