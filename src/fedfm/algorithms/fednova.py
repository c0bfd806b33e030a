"""FedNova (Wang et al. 2020, "Tackling the Objective Inconsistency Problem in Heterogeneous
Federated Optimization"): normalise each update by its client's amount of local work before
averaging, so clients that ran more steps (more data, a faster device, a later deadline) do not
pull the global model toward their own optimum.

With p_i the aggregation weights (normalised), a_i the client's normalising factor and delta_i its
update, the server step is

    delta = tau_eff * sum_i p_i delta_i / a_i,    tau_eff = sum_i p_i a_i,    x <- x + eta_g delta

a_i = tau_i (its local step count) for plain SGD; with SGD momentum rho,
a_i = [tau_i - rho (1 - rho^tau_i) / (1 - rho)] / (1 - rho) (the paper's ||a_i||_1). Adam-type
optimizers have no such closed form; a_i = tau_i there (the step-count normalisation).

Implemented as a rescaling of each update by tau_eff / a_i before the aggregator's weighted mean,
which then yields exactly the sum above (with the mean aggregator; robust aggregators see the
rescaled updates).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Mapping, Sequence

from fedfm.algorithms.base import ALGORITHMS
from fedfm.algorithms.fedavg import FedAvg

if TYPE_CHECKING:
    import torch

    from fedfm.config import AlgorithmConfig, ClientConfig
    from fedfm.types import ModelUpdate, NamedTensors


def normaliser(steps: float, momentum: float = 0.0) -> float:
    """a_i: the L1 norm of the client's step-weight vector (tau for SGD)."""
    if momentum == 0.0:
        return steps
    rho = momentum
    return (steps - rho * (1 - rho**steps) / (1 - rho)) / (1 - rho)


@ALGORITHMS.register("fednova")
@dataclass(frozen=True)
class FedNova(FedAvg):
    momentum: float = 0.0
    needs_client_config = True

    @classmethod
    def from_config(cls, cfg: "AlgorithmConfig", client: "ClientConfig", num_clients: int = 1) -> "FedNova":
        rho = client.momentum if client.optimizer == "sgd" else 0.0
        return cls(server_lr=cls.server_lr if cfg.server_lr is None else cfg.server_lr, momentum=rho)

    def before_aggregate(self, updates: "list[ModelUpdate]", metrics: "Sequence[Mapping[str, float]]",
                         state: "NamedTensors", num_clients: int, uniform: bool
                         ) -> "tuple[list[ModelUpdate], dict[str, torch.Tensor]]":
        # a client that trained took at least one step: a reported count below 1 (a broken or lying
        # client) would blow its update up by tau_eff / a_i, so it counts as 1
        a = [normaliser(max(float(m.get("steps", 0.0)), 1.0), self.momentum) if m.get("steps", 0.0) > 0 else 0.0
             for m in metrics]
        raw = [1.0 if uniform else u.weight for u in updates]
        total = sum(raw)
        tau_eff = sum(w / total * ai for w, ai in zip(raw, a))
        # a client that took no step sent a zero update: it stays as it is (and adds 0 to tau_eff)
        out = [u if ai <= 0 else replace(u, delta={k: v * (tau_eff / ai) for k, v in u.delta.items()})
               for u, ai in zip(updates, a)]
        return out, dict(state)
