"""Weighted mean against hand-computed values."""

from __future__ import annotations

import pytest
import torch

from fedfm.aggregators import build_aggregator
from fedfm.config import AggregatorConfig
from fedfm.types import ModelUpdate


def _u(vals, n):
    return ModelUpdate(delta={"a": torch.tensor(vals, dtype=torch.float32)}, weight=float(n), num_examples=n)


def test_weighted_by_examples():
    agg = build_aggregator(AggregatorConfig(name="mean", weighting="examples"))
    out = agg.aggregate([_u([1.0, 0.0], 1), _u([4.0, 3.0], 3)])
    assert out["a"].tolist() == pytest.approx([(1 * 1 + 4 * 3) / 4, (0 + 9) / 4])


def test_uniform_weighting():
    agg = build_aggregator(AggregatorConfig(name="mean", weighting="uniform"))
    out = agg.aggregate([_u([1.0, 0.0], 1), _u([4.0, 3.0], 3)])
    assert out["a"].tolist() == pytest.approx([2.5, 1.5])


def test_dtype_kept():
    agg = build_aggregator(AggregatorConfig())
    out = agg.aggregate([_u([1.0], 1), _u([2.0], 1)])
    assert out["a"].dtype == torch.float32


def test_empty_refused():
    with pytest.raises(ValueError, match="zero updates"):
        build_aggregator(AggregatorConfig()).aggregate([])
