"""SCAFFOLD (Karimireddy et al. 2020, "SCAFFOLD: Stochastic Controlled Averaging for Federated
Learning"), Algorithm 1 with option II for the client control variate.

Server state: the global control variate ``c`` (``opt_state["c/<name>"]``). Client state: its own
control variate ``c_i``, kept where its runtime keeps client state (the in-process client-state
store, spilled to disk past ``runtime.client_state_mb``), zero before a client's first round.

    client i, K local SGD steps at rate eta_l from x:   y <- y - eta_l (g_i(y) - c_i + c)
                                                         c_i+ = c_i - c + (x - y) / (K eta_l)
    server, over the cohort S of N clients:             x <- x + eta_g * mean_i (y_i - x)
                                                         c <- c + |S|/N * mean_i (c_i+ - c_i)

The correction ``c - c_i`` enters as the gradient of the linear term <w, c - c_i> added to the
local loss, so any trainer that minimises loss + regularizer applies it. The client does not send
``c_i+ - c_i``: under option II it equals ``-c - delta_i / (K_i eta_l)``, a function of the update
``delta_i = y_i - x`` and the step count the server receives anyway, so the server computes it
(the paper's second upload is redundant; with a lossy compressor the server's copy uses the
decoded update). The download carries ``c`` beside ``x`` (twice the bytes, as in the paper).

SCAFFOLD is defined for plain SGD steps: the config refuses other client optimizers and momentum.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from fedfm.algorithms.base import ALGORITHMS, CLIENT_STATE

if TYPE_CHECKING:
    import torch

    from fedfm.config import AlgorithmConfig, ClientConfig
    from fedfm.types import ClientTask, ModelUpdate, NamedTensors

CONTROL = "control"
"""ClientTask.payload key of the server control variate (name -> tensor)."""


@ALGORITHMS.register("scaffold")
@dataclass(frozen=True)
class Scaffold:
    local_lr: float
    num_clients: int
    server_lr: float = 1.0
    needs_client_config = True

    @classmethod
    def from_config(cls, cfg: "AlgorithmConfig", client: "ClientConfig", num_clients: int) -> "Scaffold":
        return cls(local_lr=client.lr, num_clients=num_clients,
                   server_lr=cls.server_lr if cfg.server_lr is None else cfg.server_lr)

    def init_state(self, params: "NamedTensors") -> "dict[str, torch.Tensor]":
        import torch

        return {f"c/{k}": torch.zeros_like(p) for k, p in params.items()}

    def client_payload(self, state: Any = None) -> Mapping[str, Any]:
        if not state:
            return {}
        return {CONTROL: {k[2:]: v for k, v in state.items() if k.startswith("c/")}}

    def client_regularizer(self, params: "Mapping[str, torch.Tensor]", anchor: "NamedTensors",
                           payload: Mapping[str, Any]) -> "torch.Tensor | None":
        c = payload.get(CONTROL)
        if not c:
            return None
        own = payload.get(CLIENT_STATE) or {}
        total = None
        for k, ck in c.items():
            ci = own.get(f"c/{k}")
            corr = ck if ci is None else ck - ci
            term = (params[k] * corr.to(params[k].dtype).detach()).sum()
            total = term if total is None else total + term
        return total

    def client_finish(self, task: "ClientTask", delta: "NamedTensors", metrics: Mapping[str, float]
                      ) -> "dict[str, torch.Tensor] | None":
        """c_i+ = c_i - c - delta / (K eta_l) (option II); unchanged when no step was taken."""
        import torch

        own = dict(task.payload.get(CLIENT_STATE) or {})
        c = task.payload.get(CONTROL) or {}
        steps = float(metrics.get("steps", 0.0))
        if steps <= 0 or not c:
            return own or None
        scale = 1.0 / (steps * self.local_lr)
        return {f"c/{k}": own.get(f"c/{k}", torch.zeros_like(c[k])) - c[k] - scale * delta[k].to(c[k].dtype)
                for k in c}

    def before_aggregate(self, updates: "list[ModelUpdate]", metrics: "Sequence[Mapping[str, float]]",
                         state: "NamedTensors", num_clients: int, uniform: bool
                         ) -> "tuple[list[ModelUpdate], dict[str, torch.Tensor]]":
        """c <- c + |S|/N * mean_i(-c - delta_i / (K_i eta_l)) over the updates that took steps."""
        new_state = dict(state)
        used = [(u, float(m.get("steps", 0.0))) for u, m in zip(updates, metrics) if m.get("steps", 0.0) > 0]
        if not used:
            return updates, new_state
        share = len(used) / max(num_clients, self.num_clients)
        for key, c in state.items():
            if not key.startswith("c/"):
                continue
            name = key[2:]
            mean_dc = sum(-c - u.delta[name].to(c.dtype) / (k * self.local_lr) for u, k in used) / len(used)
            new_state[key] = c + share * mean_dc
        return updates, new_state

    def server_update(self, params, state, delta):  # type: ignore[no-untyped-def]
        return {k: params[k] + self.server_lr * delta[k] for k in params}, dict(state)
