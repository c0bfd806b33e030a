"""Attack extension points: the spec, who is malicious, and the two kinds of attack.

An *update attack* rewrites a malicious client's honest delta before its client pipeline clips and
compresses it. A *data attack* poisons a malicious client's training examples on the fly (see
:class:`fedfm.attacks.data.PoisonedData`). An attack name maps to one or both: ``model-replacement``
is a backdoor (data) plus a boosted update.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Optional, Protocol

import numpy as np

from fedfm.registry import Registry

if TYPE_CHECKING:
    import torch

    from fedfm.types import NamedTensors

ATTACK_NAMES = ("none", "sign-flip", "scale", "noise", "label-flip", "backdoor", "model-replacement")
"""Every allowed ``attack.name`` (the config mirrors this as a Literal)."""

DEFAULT_TRIGGER = "cf mn bb"
"""Rare WordPiece tokens as a text trigger, as in RIPPLe (Kurita et al. 2020, "Weight poisoning
attacks on pretrained models")."""


@dataclass(frozen=True)
class AttackSpec:
    """What the ``[attack]`` config section holds.

    A ``None`` parameter means "the chosen attack's own default" (listed per field).

    Attributes:
        name: one of :data:`ATTACK_NAMES`; "none" disables attacks.
        fraction: share of all clients that are malicious, in [0, 1]; a fixed set for the run.
        scale: sign-flip sends ``-scale * delta`` (default 1); scale sends ``scale * delta``
            (default 10). Must be > 0.
        noise_std: standard deviation of the Gaussian update that replaces the delta ("noise").
        boost: model-replacement's update factor gamma (default: clients per round).
        target_label: class the backdoor (default 0) or label flip maps to; None for label flip
            means y -> (y + 1) mod num_classes.
        trigger: text backdoor trigger, tokenized (without special tokens) by the model's tokenizer.
        patch: side in pixels of the white square stamped in an image's bottom-right corner.
        poison_fraction: share of each malicious client's examples poisoned, in (0, 1]
            (default: 1 for label-flip, 0.5 for backdoor and model-replacement).
    """

    name: str = "none"
    fraction: float = 0.0
    scale: Optional[float] = None
    noise_std: float = 1.0
    boost: Optional[float] = None
    target_label: Optional[int] = None
    trigger: str = DEFAULT_TRIGGER
    patch: int = 3
    poison_fraction: Optional[float] = None

    def __post_init__(self) -> None:
        if self.name not in ATTACK_NAMES:
            raise ValueError(f"attack.name {self.name!r} is unknown; allowed: {', '.join(ATTACK_NAMES)}")
        if not 0.0 <= self.fraction <= 1.0:
            raise ValueError(f"attack.fraction {self.fraction} must be in [0, 1] (the share of malicious clients)")
        for key in ("scale", "boost", "noise_std"):
            _positive(key, getattr(self, key))
        if self.target_label is not None and self.target_label < 0:
            raise ValueError(f"attack.target_label {self.target_label} must be a class index >= 0 (or unset)")
        if not self.trigger.strip():
            raise ValueError("attack.trigger must be a non-empty phrase (default 'cf mn bb')")
        if self.patch < 1:
            raise ValueError(f"attack.patch {self.patch} must be >= 1 (pixels per side of the trigger square)")
        if self.poison_fraction is not None and not 0.0 < self.poison_fraction <= 1.0:
            raise ValueError(f"attack.poison_fraction {self.poison_fraction} must be in (0, 1] (or unset)")


def _positive(key: str, value: Optional[float]) -> None:
    if value is not None and not (math.isfinite(value) and value > 0):
        raise ValueError(f"attack.{key} {value} must be a finite number > 0")


def malicious_clients(num_clients: int, fraction: float, seed: int) -> frozenset[int]:
    """The malicious clients of a run: ``round(fraction * num_clients)`` ids drawn without
    replacement from ``range(num_clients)``, a pure function of the arguments (Python's
    ``round``: halves go to the even integer).

    Raises:
        ValueError: if ``fraction`` is outside [0, 1] or ``num_clients`` is negative.
    """
    if num_clients < 0 or not 0.0 <= fraction <= 1.0:
        raise ValueError(f"need num_clients >= 0 and fraction in [0, 1]; got {num_clients}, {fraction}")
    k = round(fraction * num_clients)
    chosen = np.random.default_rng([seed, 0xA77AC]).choice(num_clients, size=k, replace=False)
    return frozenset(int(c) for c in chosen)


class UpdateAttack(Protocol):
    def apply(self, delta: "NamedTensors", generator: "torch.Generator") -> "dict[str, torch.Tensor]":
        """The malicious delta to send instead of the honest ``delta`` (same names, shapes, dtypes).
        ``generator`` is the only source of randomness."""
        ...


class DataAttack(Protocol):
    poison_fraction: float

    def poison(self, data: Any, idx: np.ndarray, rows: np.ndarray) -> "dict[str, torch.Tensor]":
        """``data.batch(idx)`` with the examples at positions ``rows`` (bool, one per index) poisoned."""
        ...


UPDATE_ATTACKS: Registry[type] = Registry("update attack")
DATA_ATTACKS: Registry[type] = Registry("data attack")


@dataclass(frozen=True)
class Attack:
    """A built attack: who is malicious and what they do; the one object the lead hooks in.

    Attributes:
        name: the attack's name.
        malicious: the malicious client ids (fixed for the run).
        update: rewrites malicious deltas, or None.
        data: poisons malicious clients' examples, or None.
        seed: seeds which of a malicious client's examples are poisoned.
    """

    name: str
    malicious: frozenset[int]
    update: Optional[UpdateAttack] = None
    data: Optional[DataAttack] = None
    seed: int = 0

    def apply_update(self, client_id: int, delta: "NamedTensors", generator: "torch.Generator") -> "NamedTensors":
        """The delta client ``client_id`` sends: rewritten if it is malicious and the attack
        rewrites updates, else ``delta`` itself."""
        if self.update is None or client_id not in self.malicious:
            return delta
        return self.update.apply(delta, generator)

    def wrap(self, data: Any, client_indices: Mapping[int, np.ndarray]) -> Any:
        """The training pool as the clients see it: ``data`` itself without a data attack, else a
        :class:`~fedfm.attacks.data.PoisonedData` view poisoning malicious clients' examples."""
        if self.data is None or not self.malicious:
            return data
        from fedfm.attacks.data import PoisonedData

        return PoisonedData.build(data, self.data, client_indices, self.malicious, self.seed)


def build_attack(spec: AttackSpec, *, num_clients: int, clients_per_round: int, num_classes: int, seed: int,
                 tokenizer: Any = None) -> Attack:
    """The attack ``spec`` describes for a federation of ``num_clients``.

    Args:
        spec: the attack settings.
        num_clients: clients in the federation (the malicious ones are drawn from these).
        clients_per_round: cohort size (model-replacement's default boost).
        num_classes: classes of the task (label flipping; target label check).
        seed: the experiment seed.
        tokenizer: the model's tokenizer, for text backdoors (None for images).

    Raises:
        ValueError: if the target label is not a class of the task.
    """
    if spec.target_label is not None and spec.target_label >= num_classes:
        raise ValueError(f"attack.target_label {spec.target_label} is not a class; the task has classes "
                         f"0..{num_classes - 1}")
    update = data = None
    if spec.name in UPDATE_ATTACKS:
        update = UPDATE_ATTACKS.get(spec.name).from_spec(spec, clients_per_round=clients_per_round)
    if spec.name in DATA_ATTACKS:
        data = DATA_ATTACKS.get(spec.name).from_spec(spec, num_classes=num_classes, tokenizer=tokenizer)
    return Attack(spec.name, malicious_clients(num_clients, spec.fraction, seed), update, data, seed)
