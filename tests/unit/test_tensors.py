"""The fused fast paths of fedfm.tensors and wire.encoded_size against their plain references."""

from __future__ import annotations

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


def test_cohort_screen_equals_one_by_one():
    """The stacked norms of a cohort give the same verdicts and norms as each update alone."""
    from fedfm.round import _norms64, check_update, screen
    from fedfm.types import ClientResult, ModelUpdate

    params = {k: v for k, v in _tree(0).items() if k != "i"}
    deltas = [{k: v for k, v in _tree(s, 0.1).items() if k != "i"} for s in range(5)]
    deltas[1]["a"][1, 1] = float("nan")
    deltas[2] = {k: v * 1e8 for k, v in deltas[2].items()}
    deltas[3]["b"] = torch.zeros(6)
    results = [ClientResult(c, ModelUpdate(d, 1.0, 1), {}, 0, 0) for c, d in enumerate(deltas)]
    accepted, rejected = screen(results, params, max_norm=1e3)
    assert [r.client_id for r in accepted] == [0, 4]
    one_by_one = {c: check_update(results[c].update, params, 1e3) for c in range(5)}
    assert {r["client"]: r["reason"] for r in rejected} == {c: m for c, m in one_by_one.items() if m}
    ok = [deltas[0], deltas[4]]
    for n, d in zip(_norms64(ok, params), ok):
        assert n == pytest.approx(tensors.l2_norm64(d), rel=1e-12)


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


def test_sliced_float64_arithmetic_equals_the_whole_tensor_at_once(monkeypatch):
    """add_into_ and the float64 norms go by slices for large float32 tensors (SLICE lowered here
    so a small tensor is sliced): each element's sum is the same operation, so the accumulation is
    bit for bit the one-shot add_; norms agree with float64 arithmetic on the whole tensor."""
    from fedfm.privacy.mechanisms import global_norm

    monkeypatch.setattr(tensors, "SLICE", 7)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 11, generator=g)  # 55 elements: 8 slices, the last one short
    acc = torch.randn(5, 11, generator=g, dtype=torch.float64)
    want = acc.clone().add_(x, alpha=0.37)
    got = tensors.add_into_(acc, x, 0.37)
    assert got is acc and torch.equal(acc, want)
    assert len(list(tensors.slices(x))) == 8 and torch.equal(torch.cat(list(tensors.slices(x))), x.reshape(-1))
    ref = float(x.double().square().sum().sqrt())
    assert tensors.l2_norm64({"x": x, "y": x[:1]}) == pytest.approx(
        float(torch.cat([x.reshape(-1), x[:1].reshape(-1)]).double().square().sum().sqrt()), rel=1e-14)
    assert global_norm({"x": x}) == pytest.approx(ref, rel=1e-14)
    x[2, 3] = float("inf")
    assert tensors.l2_norm64({"x": x}) == float("inf")
    x[2, 3] = float("nan")
    assert tensors.l2_norm64({"x": x}) != tensors.l2_norm64({"x": x})  # NaN
    # the weighted sum's large-tensor path (accumulated by add_into_) equals the formula in float64
    monkeypatch.setattr(tensors, "_STACK_LIMIT", 1)
    trees = [{"w": torch.randn(40, generator=g)} for _ in range(3)]
    out = tensors.weighted_sum(trees, [0.2, 0.3, 0.5])
    exact = sum(w * t["w"].double() for w, t in zip([0.2, 0.3, 0.5], trees)).float()
    torch.testing.assert_close(out["w"], exact, rtol=1.2e-7, atol=1e-12)  # float64 rounding, then the cast


def test_delta_in_place_equals_the_difference_and_never_writes_into_the_start():
    import torch

    from fedfm.runtime.client import delta_in_place

    g = torch.Generator().manual_seed(0)
    start = {"a": torch.randn(5, 3, generator=g), "b": torch.randn(4, generator=g).double(),
             "c": torch.randn(3, generator=g), "n": torch.tensor([3, 4])}
    start_copy = {k: v.clone() for k, v in start.items()}
    fresh = {k: (v + 1).clone() for k, v in start.items()}
    trained = {"a": fresh["a"], "b": fresh["b"].float(),  # another dtype: a new tensor
               "c": start["c"],  # the start itself (a client that did not train): never written
               "n": fresh["n"]}
    expect = {k: trained[k] - start[k] for k in start}
    out = delta_in_place(trained, start)
    for k in start:
        assert torch.equal(out[k], expect[k]) and out[k].dtype == expect[k].dtype, k
        assert torch.equal(start[k], start_copy[k]), k  # the start is untouched
    assert out["a"] is fresh["a"]  # the trained copy became the delta: no second copy
    assert out["c"] is not start["c"] and torch.count_nonzero(out["c"]) == 0
