"""Every registered aggregator honours the Aggregator contract."""

from __future__ import annotations

import itertools

import pytest
import torch

from fedfm.aggregators import AGGREGATORS
from fedfm.config import AggregatorConfig
from fedfm.types import ModelUpdate


def _updates(n=4):
    g = torch.Generator().manual_seed(1)
    return [ModelUpdate(delta={"w": torch.randn(5, generator=g), "b": torch.randn(2, generator=g)},
                        weight=float(i + 1), num_examples=i + 1) for i in range(n)]


@pytest.fixture(params=AGGREGATORS.names())
def agg(request):
    # a bound no test update reaches: the contract is about combining, not about clipping
    return AGGREGATORS.get(request.param).from_config(AggregatorConfig(name=request.param, max_norm=1e9))


def test_order_invariant(agg):
    ups = _updates()
    ref = agg.aggregate(ups)
    for perm in itertools.permutations(ups):
        out = agg.aggregate(list(perm))
        assert all(torch.allclose(out[k], ref[k], atol=1e-6) for k in ref)


def test_identical_updates_give_that_update(agg):
    u = _updates(1)[0]
    out = agg.aggregate([u, u, u])
    assert all(torch.allclose(out[k], u.delta[k], atol=1e-6) for k in u.delta)


def test_names_and_shapes(agg):
    ups = _updates()
    out = agg.aggregate(ups)
    assert list(out) == list(ups[0].delta)
    assert all(out[k].shape == ups[0].delta[k].shape for k in out)
