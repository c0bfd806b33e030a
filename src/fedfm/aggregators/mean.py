"""Weighted mean of client deltas, the aggregation of FedAvg (McMahan et al. 2017)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Sequence

from fedfm.aggregators.base import AGGREGATORS
from fedfm.tensors import weighted_sum

if TYPE_CHECKING:
    import torch

    from fedfm.config import AggregatorConfig
    from fedfm.types import ModelUpdate


@AGGREGATORS.register("mean")
@dataclass(frozen=True)
class WeightedMean:
    """sum_i w_i delta_i / sum_i w_i, with w_i the update's weight (examples) or 1 (uniform)."""

    weighting: Literal["examples", "uniform"] = "examples"

    @classmethod
    def from_config(cls, cfg: "AggregatorConfig") -> "WeightedMean":
        return cls(weighting=cfg.weighting)

    def aggregate(self, updates: "Sequence[ModelUpdate]") -> "dict[str, torch.Tensor]":
        if not updates:
            raise ValueError("cannot aggregate zero updates")
        raw = [u.weight if self.weighting == "examples" else 1.0 for u in updates]
        total = float(sum(raw))
        if total <= 0:
            raise ValueError(f"aggregation weights sum to {total}; need a positive total")
        return weighted_sum([u.delta for u in updates], [w / total for w in raw])
