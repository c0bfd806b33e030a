"""The fused fast paths of fedfm.tensors and wire.encoded_size against their plain references."""

from __future__ import annotations

import math

import pytest
import torch

from fedfm import tensors, wire


def _tree(seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return {"a": scale * torch.randn(3, 4, generator=g), "b": scale * torch.randn(5, generator=g),
            "i": torch.arange(3)}


def test_all_finite_with_nan_inf_and_float32_overflow():
    assert tensors.all_finite(_tree(0))
    huge = {"x": torch.full((4,), 1e30)}  # finite, but its float32 squares overflow
    assert tensors.all_finite(huge)
    for bad in (float("nan"), float("inf"), -float("inf")):
        t = _tree(1)
        t["b"][2] = bad
        assert not tensors.all_finite(t)


@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e25])
def test_fused_norm_equals_the_float64_norm(scale):
    t = _tree(2, scale)
    ref = math.sqrt(sum(float((v.double() ** 2).sum()) for k, v in t.items() if v.is_floating_point()))
    assert tensors.l2_norm64(t) == pytest.approx(ref, rel=1e-12)
    assert tensors.l2_norm(t) == pytest.approx(ref, rel=1e-6)
    t["a"][0, 0] = float("nan")
    assert math.isnan(tensors.l2_norm(t)) and math.isnan(tensors.l2_norm64(t))


def test_stacked_weighted_sum_equals_the_loop(monkeypatch):
    trees = [_tree(s) for s in range(7)]
    trees = [{k: v for k, v in t.items() if k != "i"} for t in trees]
    ws = [0.1 * (s + 1) for s in range(7)]
    fast = tensors.weighted_sum(trees, ws)
    monkeypatch.setattr(tensors, "_STACK_LIMIT", 0)
    slow = tensors.weighted_sum(trees, ws)
    for k in fast:
        assert fast[k].dtype == slow[k].dtype
        torch.testing.assert_close(fast[k], slow[k], rtol=0, atol=1e-7)


def test_encoded_size_memo_tracks_each_layout():
    for t in (_tree(0), {"x": torch.zeros(2, dtype=torch.float16)}, _tree(3), {"a": torch.zeros(3, 4)}):
        assert wire.encoded_size(t) == len(wire.encode(t))
