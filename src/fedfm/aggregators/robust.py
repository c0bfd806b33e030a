"""Byzantine-robust aggregation rules: median, trimmed mean, Krum, Multi-Krum, Bulyan, norm bound.

With f of the n updates arbitrary (Byzantine), what each rule guarantees:

- ``median``: coordinate-wise median (Yin et al. 2018, "Byzantine-robust distributed learning:
  towards optimal statistical rates", ICML). While f < n/2 every coordinate lies within the range
  of the honest values; Yin et al. prove order-optimal error rates for a Byzantine fraction < 1/2.
- ``trimmed-mean``: coordinate-wise trimmed mean (Yin et al. 2018). Drops k = floor(trim * n)
  values from each end of every coordinate; tolerates f <= k (trim >= f/n, trim < 1/2).
- ``krum``: the update with the smallest sum of squared distances to its n - f - 2 nearest
  neighbours (Blanchard et al. 2017, "Machine learning with adversaries: Byzantine tolerant
  gradient descent", NeurIPS). (alpha, f)-Byzantine resilient for n >= 2f + 3.
- ``multi-krum``: the uniform mean of the ``select`` updates with the lowest Krum scores (Blanchard
  et al. 2017); same requirement, select <= n - f.
- ``bulyan``: Krum picks theta = n - 2f updates one at a time, then each coordinate averages the
  beta = theta - 2f picked values closest to their median (El Mhamdi et al. 2018, "The hidden
  vulnerability of distributed learning in Byzantium", ICML). Needs n >= 4f + 3; besides Krum's
  guarantee it bounds the deviation of every single coordinate, which Krum and the median alone
  leave open in high dimension.
- ``norm-bound``: updates whose L2 norm exceeds max_norm are scaled down to it before the weighted
  mean (Sun et al. 2019, "Can you really backdoor federated learning?"). Not Byzantine-robust: it
  bounds each client's pull on the result to (w_i / sum w) * max_norm, which blunts backdoor
  (model-replacement) attacks.

A round may hold fewer updates than configured (rejected clients), so the n requirements are
checked on every call. All rules compute in float64, return each tensor in its delta's dtype, and
are invariant to the order of the updates bit for bit: ties are broken by the updates' content
(lexicographic order of the flattened delta), never by their position. The coordinate-wise rules
and Krum's family treat updates equally; only norm-bound uses the weights.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Optional, Sequence

from fedfm.aggregators.base import AGGREGATORS
from fedfm.aggregators.mean import WeightedMean
from fedfm.types import ModelUpdate

if TYPE_CHECKING:
    import torch

    from fedfm.config import AggregatorConfig
    from fedfm.types import NamedTensors


# ---------------------------------------------------------------------------- helpers

def _require(updates: Sequence[ModelUpdate], rule: str, f: int = 0, need: int = 1, formula: str = "1") -> int:
    """Return n, or raise naming n, f and the requirement."""
    n = len(updates)
    if n == 0:
        raise ValueError(f"{rule}: cannot aggregate zero updates")
    if n < need:
        raise ValueError(f"{rule} with f={f} needs n >= {formula} = {need} updates; got n={n}")
    return n


def _lex_cmp(a: ModelUpdate, b: ModelUpdate) -> int:
    """Total order on updates: flattened delta (name order) lexicographically, then weight, examples."""
    import torch

    for k in a.delta:
        x, y = a.delta[k].reshape(-1), b.delta[k].reshape(-1)
        ne = x != y
        if bool(ne.any()):
            i = int(ne.to(torch.uint8).argmax())  # argmax returns the first maximal index
            return -1 if bool(x[i] < y[i]) else 1
    ka, kb = (a.weight, a.num_examples), (b.weight, b.num_examples)
    return (ka > kb) - (ka < kb)


def _canonical(updates: Sequence[ModelUpdate]) -> list[ModelUpdate]:
    """The updates in content order, so later ties and float64 rounding never depend on input order."""
    return sorted(updates, key=functools.cmp_to_key(_lex_cmp))


def _stack(updates: Sequence[ModelUpdate], name: str) -> "torch.Tensor":
    """(n, *shape) float64 stack of one named tensor."""
    import torch

    return torch.stack([u.delta[name] for u in updates]).to(torch.float64)


def _flatten(updates: Sequence[ModelUpdate]) -> "torch.Tensor":
    """(n, D) float64: each update's tensors concatenated in name order."""
    import torch

    return torch.stack([torch.cat([v.reshape(-1).to(torch.float64) for v in u.delta.values()]) for u in updates])


def _unflatten(vec: "torch.Tensor", like: "NamedTensors") -> "dict[str, torch.Tensor]":
    out, at = {}, 0
    for k, ref in like.items():
        out[k] = vec[at:at + ref.numel()].reshape(ref.shape).to(ref.dtype)
        at += ref.numel()
    return out


def _sorted_coords(updates: Sequence[ModelUpdate], name: str) -> "torch.Tensor":
    """Per-coordinate ascending values, (n, *shape) float64: free of the input order."""
    return _stack(updates, name).sort(dim=0).values


def _median_of_sorted(s: "torch.Tensor") -> "torch.Tensor":
    """Median along dim 0 of sorted values; the mean of the two middle ones for an even count."""
    n = s.shape[0]
    return (s[(n - 1) // 2] + s[n // 2]) / 2


def _sq_distances(x: "torch.Tensor") -> "torch.Tensor":
    """(n, n) squared L2 distances between rows: symmetric, zero diagonal, float64.

    Uses the Gram matrix (one matmul, ~50x faster than differencing every pair) of the centred rows:
    centring removes the component all updates share, the source of cancellation in
    |a|^2 + |b|^2 - 2ab.
    """
    c = x - x.mean(dim=0)
    sq = (c * c).sum(dim=1)
    d = (sq[:, None] + sq[None, :] - 2 * (c @ c.T)).clamp_min(0)
    d = (d + d.T) / 2  # exactly symmetric, whatever the matmul's blocking
    return d.fill_diagonal_(0)


def _krum_scores(d: "torch.Tensor", f: int) -> "torch.Tensor":
    """Krum score of each row of the (r, r) distance matrix: sum of its r - f - 2 smallest distances
    to others (at least 1 neighbour when r >= 2, as Bulyan's last picks have too few for the formula)."""
    import torch

    r = d.shape[0]
    k = min(max(r - f - 2, 1), r - 1)
    others = d + torch.diag(torch.full((r,), float("inf"), dtype=d.dtype))
    return others.sort(dim=1).values[:, :k].sum(dim=1)


def _lowest(scores: "torch.Tensor", m: int) -> "torch.Tensor":
    """Indices of the m lowest scores; ties go to the lower index, i.e. the smaller content."""
    return scores.sort(stable=True).indices[:m]


# ---------------------------------------------------------------------------- coordinate-wise

@AGGREGATORS.register("median")
@dataclass(frozen=True)
class CoordinateMedian:
    """Coordinate-wise median (Yin et al. 2018); for an even n, the mean of the two middle values.

    Tolerates f < n/2 Byzantine updates per coordinate. Weights are ignored.
    """

    @classmethod
    def from_config(cls, cfg: "AggregatorConfig") -> "CoordinateMedian":
        return cls()

    def aggregate(self, updates: "Sequence[ModelUpdate]") -> "dict[str, torch.Tensor]":
        """Raises: ValueError on zero updates."""
        _require(updates, "median")
        ref = updates[0].delta
        return {k: _median_of_sorted(_sorted_coords(updates, k)).to(v.dtype) for k, v in ref.items()}


@AGGREGATORS.register("trimmed-mean")
@dataclass(frozen=True)
class TrimmedMean:
    """Coordinate-wise trimmed mean (Yin et al. 2018): per coordinate drop the k = floor(trim * n)
    largest and k smallest values and average the rest. Tolerates f <= k Byzantine updates.

    Args:
        trim: fraction cut from each end, in [0, 0.5).
    """

    trim: float = 0.1

    @classmethod
    def from_config(cls, cfg: "AggregatorConfig") -> "TrimmedMean":
        return cls(trim=cfg.trim)

    def aggregate(self, updates: "Sequence[ModelUpdate]") -> "dict[str, torch.Tensor]":
        """Raises: ValueError on zero updates or when the trim would cut every update."""
        n = _require(updates, "trimmed-mean")
        k = int(self.trim * n)  # same rounding as the config's cross-check
        if 2 * k >= n:
            raise ValueError(f"trimmed-mean: trim={self.trim} cuts k={k} from each end of n={n} updates; "
                             "need 2k < n")
        ref = updates[0].delta
        return {name: _sorted_coords(updates, name)[k:n - k].mean(dim=0).to(v.dtype) for name, v in ref.items()}


# ---------------------------------------------------------------------------- Krum family

@AGGREGATORS.register("krum")
@dataclass(frozen=True)
class Krum:
    """Krum (Blanchard et al. 2017): the update whose n - f - 2 nearest neighbours are closest.

    Args:
        f: Byzantine updates tolerated; needs n >= 2f + 3.
    """

    f: int = 0

    @classmethod
    def from_config(cls, cfg: "AggregatorConfig") -> "Krum":
        return cls(f=cfg.f)

    def aggregate(self, updates: "Sequence[ModelUpdate]") -> "dict[str, torch.Tensor]":
        """Raises: ValueError on zero updates or n < 2f + 3."""
        _require(updates, "krum", self.f, 2 * self.f + 3, "2f+3")
        ups = _canonical(updates)
        x = _flatten(ups)
        best = int(_lowest(_krum_scores(_sq_distances(x), self.f), 1)[0])
        return _unflatten(x[best], ups[0].delta)


@AGGREGATORS.register("multi-krum")
@dataclass(frozen=True)
class MultiKrum:
    """Multi-Krum (Blanchard et al. 2017): the uniform mean of the ``select`` lowest Krum scores.

    Args:
        f: Byzantine updates tolerated; needs n >= 2f + 3.
        select: updates averaged; default n - f, and capped at n - f when a round brings fewer
            updates than configured (averaging more would let an attacker in).
    """

    f: int = 0
    select: Optional[int] = None

    @classmethod
    def from_config(cls, cfg: "AggregatorConfig") -> "MultiKrum":
        return cls(f=cfg.f, select=cfg.select)

    def aggregate(self, updates: "Sequence[ModelUpdate]") -> "dict[str, torch.Tensor]":
        """Raises: ValueError on zero updates or n < 2f + 3."""
        n = _require(updates, "multi-krum", self.f, 2 * self.f + 3, "2f+3")
        m = n - self.f if self.select is None else min(self.select, n - self.f)
        ups = _canonical(updates)
        x = _flatten(ups)
        chosen = _lowest(_krum_scores(_sq_distances(x), self.f), m).sort().values  # content order
        return _unflatten(x[chosen].mean(dim=0), ups[0].delta)


@AGGREGATORS.register("bulyan")
@dataclass(frozen=True)
class Bulyan:
    """Bulyan over Krum (El Mhamdi et al. 2018).

    Krum picks theta = n - 2f updates one at a time, rescoring the remaining ones after each pick
    (with r remaining, each score sums the max(r - f - 2, 1) nearest distances: the last picks have
    too few neighbours for Krum's formula). Then each coordinate averages the beta = theta - 2f
    picked values closest to the picked values' median (even-count median: mean of the middle two;
    equally close values: the smaller first).

    Args:
        f: Byzantine updates tolerated; needs n >= 4f + 3.
    """

    f: int = 0

    @classmethod
    def from_config(cls, cfg: "AggregatorConfig") -> "Bulyan":
        return cls(f=cfg.f)

    def aggregate(self, updates: "Sequence[ModelUpdate]") -> "dict[str, torch.Tensor]":
        """Raises: ValueError on zero updates or n < 4f + 3."""
        n = _require(updates, "bulyan", self.f, 4 * self.f + 3, "4f+3")
        ups = _canonical(updates)
        picked = [ups[i] for i in self._select(_sq_distances(_flatten(ups)), n - 2 * self.f)]
        beta = n - 4 * self.f
        return {k: _closest_to_median_mean(_sorted_coords(picked, k), beta).to(v.dtype)
                for k, v in ups[0].delta.items()}

    def _select(self, d: "torch.Tensor", theta: int) -> list[int]:
        """Indices of the theta updates Krum picks one at a time from what remains."""
        import torch

        remaining = list(range(d.shape[0]))
        picked = []
        for _ in range(theta):
            idx = torch.tensor(remaining)
            best = int(_lowest(_krum_scores(d[idx][:, idx], self.f), 1)[0])
            picked.append(remaining.pop(best))
        return sorted(picked)


def _closest_to_median_mean(s: "torch.Tensor", beta: int) -> "torch.Tensor":
    """Per coordinate, the mean of the beta sorted values (dim 0) closest to their median."""
    dist = (s - _median_of_sorted(s)).abs()
    order = dist.sort(dim=0, stable=True).indices[:beta]  # stable: ties keep ascending value order
    return s.gather(0, order).mean(dim=0)


# ---------------------------------------------------------------------------- norm bound

@AGGREGATORS.register("norm-bound")
@dataclass(frozen=True)
class NormBound:
    """Norm bounding (Sun et al. 2019): scale each update with L2 norm > max_norm down to max_norm,
    then take the weighted mean exactly as ``mean`` does. Updates within the bound are passed on
    untouched.

    Args:
        max_norm: bound on each update's global L2 norm (all its tensors together).
        weighting: weights of the mean, as in ``mean``.
    """

    max_norm: float = 1.0
    weighting: Literal["examples", "uniform"] = "examples"

    @classmethod
    def from_config(cls, cfg: "AggregatorConfig") -> "NormBound":
        return cls(max_norm=cfg.max_norm, weighting=cfg.weighting)

    def aggregate(self, updates: "Sequence[ModelUpdate]") -> "dict[str, torch.Tensor]":
        """Raises: ValueError on zero updates or weights that do not sum to a positive total."""
        _require(updates, "norm-bound")
        bounded = [self.bound(u) for u in _canonical(updates)]
        return WeightedMean(weighting=self.weighting).aggregate(bounded)

    def bound(self, update: ModelUpdate) -> ModelUpdate:
        """The update scaled to L2 norm max_norm if it exceeds it (in float64), else the same object."""
        import torch

        norm = float(torch.sqrt(sum((v.to(torch.float64) ** 2).sum() for v in update.delta.values())))
        if norm <= self.max_norm:
            return update
        scale = self.max_norm / norm
        delta = {k: (v.to(torch.float64) * scale).to(v.dtype) for k, v in update.delta.items()}
        return ModelUpdate(delta=delta, weight=update.weight, num_examples=update.num_examples)
