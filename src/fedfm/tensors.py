"""Small arithmetic on NamedTensors (name-aligned, order-preserving)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

if TYPE_CHECKING:
    import torch

    from fedfm.types import NamedTensors


def zip_map(fn: "Callable[..., torch.Tensor]", *trees: "NamedTensors") -> "dict[str, torch.Tensor]":
    """Apply ``fn`` name by name over trees sharing the first tree's names."""
    first = trees[0]
    return {k: fn(*(t[k] for t in trees)) for k in first}


def sub(a: "NamedTensors", b: "NamedTensors") -> "dict[str, torch.Tensor]":
    return zip_map(lambda x, y: x - y, a, b)





def weighted_sum(trees: "Sequence[NamedTensors]", weights: Iterable[float]) -> "dict[str, torch.Tensor]":
    """sum_i w_i * tree_i, accumulated in float64 so the result does not depend on summation order
    beyond float64 rounding, then cast back to each tensor's dtype."""
    import torch

    ws = list(weights)
    out = {}
    for k, ref in trees[0].items():
        acc = torch.zeros(ref.shape, dtype=torch.float64)
        for t, w in zip(trees, ws):
            acc += t[k].to(torch.float64) * w
        out[k] = acc.to(ref.dtype)
    return out



def all_finite(a: "NamedTensors") -> bool:
    import torch

    # one reduction per tensor: a sum in float64 is NaN or Inf iff some element is (float64 cannot
    # overflow on sums of float32 values), half the work of isfinite(v).all()
    return all(math.isfinite(float(v.sum(dtype=torch.float64))) if v.is_floating_point() else True
               for v in a.values())
