"""Robust aggregators against slow pure-Python references, their no-exclusion limits (the plain
mean), bit-for-bit order invariance, and tolerance of Byzantine updates."""

from __future__ import annotations

import re
import statistics

import numpy as np
import pytest
import torch

from fedfm.aggregators import AGGREGATORS, build_aggregator
from fedfm.aggregators.robust import NormBound, TrimmedMean
from fedfm.config import AggregatorConfig
from fedfm.types import ModelUpdate

ROBUST = ["median", "trimmed-mean", "krum", "multi-krum", "bulyan", "norm-bound"]
SHAPES = [{"w": (3, 4), "b": (5,)}, {"a": (2, 3, 2), "s": (1,), "c": (4,)}]
# results are computed in float64 and cast back, so each dtype is held to its own rounding
TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=1e-6, atol=1e-6)}


def _agg(name, **kw):
    return build_aggregator(AggregatorConfig(name=name, **kw))


def _updates(n, shapes=SHAPES[0], seed=0, dtype=torch.float32, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [ModelUpdate(delta={k: (scale * torch.randn(s, generator=g, dtype=torch.float64)).to(dtype)
                               for k, s in shapes.items()},
                        weight=float(w), num_examples=int(w))
            for w in torch.randint(1, 50, (n,), generator=g)]


def _flat(tree):
    return np.concatenate([t.double().numpy().ravel() for t in tree.values()])


def _close(out, ref_flat, dtype):
    assert np.allclose(_flat(out), ref_flat, **TOL[dtype])


# ---------------------------------------------------------------------------- slow references
# Plain Python over coordinates and pairs, written from the papers, not from the implementation.

def _cols(vs):
    return list(zip(*[list(v) for v in vs]))


def ref_median(vs):
    return np.array([statistics.median(c) for c in _cols(vs)])  # statistics.median: mean of middle two


def ref_trimmed(vs, trim):
    n = len(vs)
    k = int(trim * n)
    return np.array([sum(sorted(c)[k:n - k]) / (n - 2 * k) for c in _cols(vs)])


def _ref_scores(vs, f, idx):
    """Krum scores of vs[idx]; the key sorts ties (mutual nearest neighbours) by content."""
    r = len(idx)
    k = min(max(r - f - 2, 1), r - 1)
    scores = {}
    for i in idx:
        ds = sorted(sum((a - b) ** 2 for a, b in zip(vs[i], vs[j])) for j in idx if j != i)
        scores[i] = (sum(ds[:k]), tuple(vs[i]))
    return scores


def ref_krum(vs, f):
    s = _ref_scores(vs, f, list(range(len(vs))))
    return vs[min(s, key=s.get)]


def ref_multi_krum(vs, f, m):
    s = _ref_scores(vs, f, list(range(len(vs))))
    return np.mean([vs[i] for i in sorted(s, key=s.get)[:m]], axis=0)


def ref_bulyan(vs, f):
    n = len(vs)
    remaining, picked = list(range(n)), []
    for _ in range(n - 2 * f):
        s = _ref_scores(vs, f, remaining)
        best = min(s, key=s.get)
        picked.append(best)
        remaining.remove(best)
    beta = n - 4 * f
    out = []
    for c in _cols([vs[i] for i in picked]):
        med = statistics.median(c)
        closest = sorted(c, key=lambda v: (abs(v - med), v))[:beta]
        out.append(sum(closest) / beta)
    return np.array(out)


def ref_norm_bound(updates, max_norm, weighting):
    vs = [_flat(u.delta) for u in updates]
    vs = [v * min(1.0, max_norm / np.sqrt(sum(x * x for x in v))) for v in vs]
    w = np.array([u.weight if weighting == "examples" else 1.0 for u in updates])
    return sum(wi * v for wi, v in zip(w, vs)) / w.sum()


# ---------------------------------------------------------------------------- against references

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shapes", SHAPES)
@pytest.mark.parametrize("n", [1, 2, 5, 6])
def test_median_matches_reference(n, shapes, dtype):
    ups = _updates(n, shapes, seed=n, dtype=dtype)
    _close(_agg("median").aggregate(ups), ref_median([_flat(u.delta) for u in ups]), dtype)


def test_median_even_count_is_mean_of_middle_two():
    ups = [ModelUpdate(delta={"a": torch.tensor([v])}, weight=1.0, num_examples=1) for v in (4.0, 1.0, 10.0, 2.0)]
    assert _agg("median").aggregate(ups)["a"].item() == 3.0  # torch.median would say 2


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shapes", SHAPES)
@pytest.mark.parametrize("n,trim", [(7, 0.1), (7, 0.3), (10, 0.25), (10, 0.45)])
def test_trimmed_mean_matches_reference(n, trim, shapes, dtype):
    ups = _updates(n, shapes, seed=n, dtype=dtype)
    _close(_agg("trimmed-mean", trim=trim).aggregate(ups), ref_trimmed([_flat(u.delta) for u in ups], trim), dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shapes", SHAPES)
@pytest.mark.parametrize("n,f", [(3, 0), (6, 1), (9, 2)])
def test_krum_matches_reference(n, f, shapes, dtype):
    ups = _updates(n, shapes, seed=10 + n, dtype=dtype)
    _close(_agg("krum", f=f).aggregate(ups), ref_krum([_flat(u.delta) for u in ups], f), dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shapes", SHAPES)
@pytest.mark.parametrize("n,f,select", [(6, 1, None), (6, 1, 2), (9, 2, 1), (9, 2, 4)])
def test_multi_krum_matches_reference(n, f, select, shapes, dtype):
    ups = _updates(n, shapes, seed=20 + n, dtype=dtype)
    m = n - f if select is None else select
    out = _agg("multi-krum", f=f, select=select).aggregate(ups)
    _close(out, ref_multi_krum([_flat(u.delta) for u in ups], f, m), dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shapes", SHAPES)
@pytest.mark.parametrize("n,f", [(3, 0), (7, 1), (8, 1), (11, 2)])  # theta odd and even (n=8: theta=6)
def test_bulyan_matches_reference(n, f, shapes, dtype):
    ups = _updates(n, shapes, seed=30 + n, dtype=dtype)
    _close(_agg("bulyan", f=f).aggregate(ups), ref_bulyan([_flat(u.delta) for u in ups], f), dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("weighting", ["examples", "uniform"])
@pytest.mark.parametrize("shapes", SHAPES)
def test_norm_bound_matches_reference(shapes, weighting, dtype):
    ups = _updates(6, shapes, seed=40, dtype=dtype)
    bound = float(np.median([np.linalg.norm(_flat(u.delta)) for u in ups]))  # half bounded, half untouched
    out = _agg("norm-bound", max_norm=bound, weighting=weighting).aggregate(ups)
    _close(out, ref_norm_bound(ups, bound, weighting), dtype)


# ---------------------------------------------------------------------------- nothing excluded: the mean

def test_identical_updates_give_that_update_for_coordinate_rules_and_krum():
    u = _updates(1)[0]
    for name, kw in [("median", {}), ("trimmed-mean", {"trim": 0.4}), ("krum", {"f": 1}),
                     ("multi-krum", {"f": 1}), ("bulyan", {"f": 1})]:
        out = _agg(name, **kw).aggregate([u] * 7)
        assert all(torch.equal(out[k], u.delta[k]) for k in u.delta), name


@pytest.mark.parametrize("n", [1, 4, 7])
def test_trimmed_mean_without_trim_is_uniform_mean_exactly(n):
    ups = _updates(n, seed=50)
    out, ref = _agg("trimmed-mean", trim=0.0).aggregate(ups), _agg("mean", weighting="uniform").aggregate(ups)
    assert all(torch.equal(out[k], ref[k]) for k in ref)


def test_multi_krum_selecting_all_is_uniform_mean():
    ups = _updates(5, seed=51)
    out, ref = _agg("multi-krum", f=0, select=5).aggregate(ups), _agg("mean", weighting="uniform").aggregate(ups)
    assert all(torch.equal(out[k], ref[k]) for k in ref)


def test_bulyan_without_byzantine_is_uniform_mean():
    ups = _updates(5, seed=52)
    out, ref = _agg("bulyan", f=0).aggregate(ups), _agg("mean", weighting="uniform").aggregate(ups)
    assert all(torch.allclose(out[k], ref[k], **TOL[torch.float32]) for k in ref)


@pytest.mark.parametrize("weighting", ["examples", "uniform"])
def test_norm_bound_with_huge_bound_is_weighted_mean(weighting):
    ups = _updates(6, seed=53)
    out = _agg("norm-bound", max_norm=1e9, weighting=weighting).aggregate(ups)
    ref = _agg("mean", weighting=weighting).aggregate(ups)
    assert all(torch.equal(out[k], ref[k]) for k in ref)


def test_multi_krum_select_is_capped_at_n_minus_f():
    """A round with fewer updates than configured must not average in more than n - f."""
    ups = _updates(7, seed=54)
    capped = _agg("multi-krum", f=1, select=9).aggregate(ups)
    ref = _agg("multi-krum", f=1, select=6).aggregate(ups)
    assert all(torch.equal(capped[k], ref[k]) for k in ref)


# ---------------------------------------------------------------------------- order invariance

def _tied_updates():
    """Integer-valued updates: equal coordinates, equal distances, equal Krum scores, duplicates with
    different weights."""
    g = torch.Generator().manual_seed(60)
    ups = [ModelUpdate(delta={"w": torch.randint(0, 3, (3, 4), generator=g).float(),
                              "b": torch.randint(0, 2, (5,), generator=g).float()}, weight=float(i + 1),
                       num_examples=i + 1) for i in range(7)]
    return ups + [ModelUpdate(delta=ups[0].delta, weight=100.0, num_examples=100)]


@pytest.mark.parametrize("inputs", ["random", "ties"])
@pytest.mark.parametrize("name", ROBUST)
def test_order_invariant_bit_for_bit(name, inputs):
    ups = _updates(8, seed=61) if inputs == "random" else _tied_updates()
    agg = _agg(name, f=1, trim=0.25, max_norm=2.0, select=4)
    ref = agg.aggregate(ups)
    rng = np.random.default_rng(0)
    for _ in range(10):
        out = agg.aggregate([ups[i] for i in rng.permutation(len(ups))])
        assert all(torch.equal(out[k], ref[k]) for k in ref)


def test_krum_tie_goes_to_smallest_content():
    square = [[1.0, 1.0], [0.0, 1.0], [1.0, 0.0], [0.0, 0.0]]  # every vertex scores 2 with f=0
    ups = [ModelUpdate(delta={"a": torch.tensor(v)}, weight=1.0, num_examples=1) for v in square]
    assert _agg("krum", f=0).aggregate(ups)["a"].tolist() == [0.0, 0.0]


# ---------------------------------------------------------------------------- Byzantine tolerance

N_HONEST, F = 9, 2


def _attacked(attack):
    """9 honest updates within ~0.01 of a point, 2 attackers; returns (updates, honest mean)."""
    g = torch.Generator().manual_seed(70)
    center = {"w": torch.randn(3, 4, generator=g), "b": torch.randn(5, generator=g)}
    honest = [ModelUpdate(delta={k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in center.items()},
                          weight=10.0, num_examples=10) for _ in range(N_HONEST)]
    bad = {"huge": [1e6, 1e6], "opposite": [1e6, -1e3], "colluding": [5.0, 5.0]}[attack]
    evil = [ModelUpdate(delta={k: v + c for k, v in center.items()}, weight=10.0, num_examples=10) for c in bad]
    mean = _agg("mean", weighting="uniform").aggregate(honest)
    return honest + evil, mean


def _dist(a, b):
    return float(np.linalg.norm(_flat(a) - _flat(b)))


@pytest.mark.parametrize("attack", ["huge", "opposite", "colluding"])
@pytest.mark.parametrize("name", ["median", "trimmed-mean", "krum", "multi-krum", "bulyan"])
def test_robust_rules_stay_near_honest_mean(name, attack):
    ups, honest_mean = _attacked(attack)
    assert len(ups) >= 4 * F + 3  # bulyan's requirement
    out = _agg(name, f=F, trim=F / len(ups) + 0.01).aggregate(ups)
    assert _dist(out, honest_mean) < 0.1  # honest spread is ~0.01 per coordinate, 17 coordinates
    plain = _agg("mean", weighting="uniform").aggregate(ups)
    assert _dist(plain, honest_mean) > 1.0  # the plain mean is dragged away (the test can fail)


# ---------------------------------------------------------------------------- norm bound

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_norm_bound_scales_large_updates_to_the_bound(dtype):
    nb = NormBound(max_norm=0.5)
    rel = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-2}[dtype]
    for u in _updates(5, seed=80, dtype=dtype, scale=3.0):
        b = nb.bound(u)
        v, bv = _flat(u.delta), _flat(b.delta)
        assert np.linalg.norm(bv) <= 0.5 * (1 + rel)
        assert np.allclose(bv, v * 0.5 / np.linalg.norm(v), rtol=rel, atol=rel)  # the scaled copy
        assert (b.weight, b.num_examples) == (u.weight, u.num_examples)
    big = _updates(1, seed=81, dtype=dtype, scale=3.0)
    out = nb.aggregate(big)
    assert np.linalg.norm(_flat(out)) <= 0.5 * (1 + rel)


def test_norm_bound_leaves_small_updates_untouched():
    nb = NormBound(max_norm=100.0)
    u = _updates(1, seed=82)[0]
    assert nb.bound(u) is u
    out = nb.aggregate([u])
    assert all(torch.equal(out[k], u.delta[k]) for k in u.delta)


def test_norm_bound_limits_an_attackers_pull():
    ups, honest_mean = _attacked("huge")
    out = _agg("norm-bound", max_norm=10.0, weighting="uniform").aggregate(ups)
    # honest norms are ~4 (< 10) so untouched; each attacker moves the mean by at most 10 / n plus its own share
    honest_share = _agg("mean", weighting="uniform").aggregate(ups[:N_HONEST])
    assert _dist(out, {k: v * N_HONEST / len(ups) for k, v in honest_share.items()}) <= F * 10.0 / len(ups) + 1e-5


# ---------------------------------------------------------------------------- contract details and errors

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ROBUST)
def test_names_shapes_dtypes_kept(name, dtype):
    ups = _updates(7, SHAPES[1], seed=90, dtype=dtype)
    out = _agg(name, f=1).aggregate(ups)
    assert list(out) == list(ups[0].delta)
    assert all(out[k].shape == v.shape and out[k].dtype == dtype for k, v in ups[0].delta.items())


def test_all_registered():
    assert set(ROBUST) <= set(AGGREGATORS.names())


@pytest.mark.parametrize("name", ROBUST)
def test_zero_updates_refused(name):
    with pytest.raises(ValueError, match="zero updates"):
        _agg(name).aggregate([])


@pytest.mark.parametrize("name,f,n,need", [("krum", 1, 4, 5), ("multi-krum", 2, 6, 7), ("bulyan", 1, 6, 7),
                                           ("bulyan", 2, 10, 11)])
def test_too_few_updates_refused_naming_the_numbers(name, f, n, need):
    with pytest.raises(ValueError) as e:
        _agg(name, f=f).aggregate(_updates(n))
    msg = str(e.value)
    assert all(re.search(p, msg) for p in [rf"\bn={n}\b", rf"\bf={f}\b", rf"\b{need}\b"]), msg
    _agg(name, f=f).aggregate(_updates(need))  # the bound is tight


def test_trimmed_mean_refuses_to_cut_everything():
    with pytest.raises(ValueError, match="n=4"):
        TrimmedMean(trim=0.5).aggregate(_updates(4))
