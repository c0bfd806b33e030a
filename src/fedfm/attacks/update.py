"""Update (model-poisoning) attacks: a malicious client rewrites its honest delta.

Each is applied to the delta as trained, before the client pipeline clips, noises and compresses
it, so clipping and robust aggregation see exactly what a real attacker would send.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from fedfm.attacks.base import UPDATE_ATTACKS, AttackSpec

if TYPE_CHECKING:
    from fedfm.types import NamedTensors


def _scaled(delta: "NamedTensors", factor: float) -> dict[str, torch.Tensor]:
    return {name: t * factor for name, t in delta.items()}


@UPDATE_ATTACKS.register("sign-flip")
@dataclass(frozen=True)
class SignFlip:
    """delta -> -scale * delta: the sign-flipping Byzantine client of Damaskinos et al. 2018
    ("Asynchronous Byzantine machine learning") and Li et al. 2019 ("RSA: Byzantine-robust
    stochastic aggregation"), which pushes the mean against descent."""

    scale: float = 1.0

    @classmethod
    def from_spec(cls, spec: AttackSpec, *, clients_per_round: int) -> "SignFlip":
        return cls(scale=cls.scale if spec.scale is None else spec.scale)

    def apply(self, delta: "NamedTensors", generator: torch.Generator) -> dict[str, torch.Tensor]:
        return _scaled(delta, -self.scale)


@UPDATE_ATTACKS.register("scale")
@dataclass(frozen=True)
class Scale:
    """delta -> scale * delta: explicit boosting (Bhagoji et al. 2019, "Analyzing federated
    learning through an adversarial lens"), which lets one client dominate a plain mean."""

    scale: float = 10.0

    @classmethod
    def from_spec(cls, spec: AttackSpec, *, clients_per_round: int) -> "Scale":
        return cls(scale=cls.scale if spec.scale is None else spec.scale)

    def apply(self, delta: "NamedTensors", generator: torch.Generator) -> dict[str, torch.Tensor]:
        return _scaled(delta, self.scale)


@UPDATE_ATTACKS.register("noise")
@dataclass(frozen=True)
class GaussianNoise:
    """delta -> N(0, std^2 I), discarding the honest delta: the Gaussian Byzantine client of
    Blanchard et al. 2017 ("Machine learning with adversaries", Krum) and Li et al. 2019. Drawn in
    at least float32 from ``generator``, tensor by tensor in the delta's order."""

    std: float = 1.0

    @classmethod
    def from_spec(cls, spec: AttackSpec, *, clients_per_round: int) -> "GaussianNoise":
        return cls(std=spec.noise_std)

    def apply(self, delta: "NamedTensors", generator: torch.Generator) -> dict[str, torch.Tensor]:
        out = {}
        for name, t in delta.items():
            draw = torch.randn(t.shape, generator=generator, dtype=torch.promote_types(t.dtype, torch.float32))
            out[name] = (draw * self.std).to(device=t.device, dtype=t.dtype)
        return out


@UPDATE_ATTACKS.register("model-replacement")
@dataclass(frozen=True)
class ModelReplacement:
    """delta -> boost * delta, the update half of model replacement (Bagdasaryan et al. 2020,
    "How to backdoor federated learning"; the data half is the backdoor, see
    :class:`fedfm.attacks.data.Backdoor`).

    With n clients per round, server learning rate eta and a uniform mean, the attacker's scaled
    delta gamma * (X - G) with gamma = n / eta moves the global model G to (about) its backdoored
    model X, the honest deltas nearly cancelling near convergence. The default ``boost`` is
    n (FedAvg, eta = 1); under example weighting the effective factor is boost times the
    attacker's weight share times n.
    """

    boost: float

    @classmethod
    def from_spec(cls, spec: AttackSpec, *, clients_per_round: int) -> "ModelReplacement":
        return cls(boost=float(clients_per_round) if spec.boost is None else spec.boost)

    def apply(self, delta: "NamedTensors", generator: torch.Generator) -> dict[str, torch.Tensor]:
        return _scaled(delta, self.boost)
