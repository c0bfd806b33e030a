"""Aggregator extension point: combine client updates into one pseudo-gradient.

Aggregators are a separate axis from algorithms: an algorithm only sees the result.
Every aggregator must be invariant to the order of the updates (checked by the
contract suite in tests/contracts).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, Sequence

from fedfm.registry import Registry

if TYPE_CHECKING:
    import torch

    from fedfm.config import AggregatorConfig
    from fedfm.types import ModelUpdate


class Aggregator(Protocol):
    def aggregate(self, updates: "Sequence[ModelUpdate]") -> "dict[str, torch.Tensor]":
        """Combine at least one update into a single delta with the same names and shapes."""
        ...


AGGREGATORS: Registry[type] = Registry("aggregator")


def build_aggregator(cfg: "AggregatorConfig") -> Aggregator:
    return AGGREGATORS.get(cfg.name).from_config(cfg)  # type: ignore[attr-defined, no-any-return]
