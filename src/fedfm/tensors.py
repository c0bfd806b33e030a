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
    beyond float64 rounding, then cast back to each tensor's dtype. Small tensors are stacked and
    reduced in one call per name (many clients' small updates: one op instead of one per client)."""
    import torch

    ws = list(weights)
    w64 = torch.tensor(ws, dtype=torch.float64)
    out = {}
    for k, ref in trees[0].items():
        if ref.numel() * len(trees) <= _STACK_LIMIT:
            stacked = torch.stack([t[k] for t in trees]).to(torch.float64)
            acc = torch.tensordot(w64, stacked, dims=1)
        else:
            acc = torch.zeros(ref.shape, dtype=torch.float64)
            for t, w in zip(trees, ws):
                add_into_(acc, t[k], w)
        out[k] = acc.to(ref.dtype)
    return out


SLICE = 1 << 18
"""Elements per slice when a float32 tensor meets float64 arithmetic (sums, norms). torch upcasts
the whole float32 operand into a temporary first; for a tensor of tens of MB that fresh
allocation (memory the allocator maps anew, page by page, every time) costs ten times the
arithmetic: 11M elements, 1 thread: a float64 add of float32 values 147 ms whole, 19 ms in
slices of 256K; a float64 norm 143 ms whole, 14 ms in slices. Slices of 2 MB in float64 stay in
the allocator's reused memory and in cache."""


def slices(v: "torch.Tensor") -> "Iterable[torch.Tensor]":
    """``v`` itself if it has at most ``SLICE`` elements, else consecutive flat slices of it."""
    if v.numel() <= SLICE:
        return (v,)
    flat = v.reshape(-1)
    return (flat[s:s + SLICE] for s in range(0, flat.numel(), SLICE))


def add_into_(acc: "torch.Tensor", x: "torch.Tensor", alpha: float = 1.0) -> "torch.Tensor":
    """``acc += alpha * x`` in acc's dtype (a float64 accumulator of float32 updates), by slices
    when the dtypes differ and x is large (see ``SLICE``); the same sums as one ``add_``."""
    if acc.dtype == x.dtype or x.numel() <= SLICE or not acc.is_contiguous():
        return acc.add_(x, alpha=alpha)
    for a, b in zip(slices(acc), slices(x)):
        a.add_(b, alpha=alpha)
    return acc


_STACK_LIMIT = 1 << 22
"""Elements (clients x tensor size) up to which weighted_sum stacks a name's tensors (32 MB in float64)."""


def all_finite(a: "NamedTensors") -> bool:
    """Whether every value is finite: one fused norm over all tensors (a norm is NaN or Inf iff
    some element is, or the float32 squares overflow); only then the exact per-tensor float64 check."""
    import torch

    floats = [v for v in a.values() if v.is_floating_point()]
    if not floats:
        return True
    if math.isfinite(float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(floats))))):
        return True
    # float64 sums cannot overflow on float32 values: NaN or Inf iff some element is
    return all(math.isfinite(float(v.sum(dtype=torch.float64))) for v in floats)


def l2_norm64(a: "NamedTensors") -> float:
    """The L2 norm over all floating tensors, exact in float64 (NaN/Inf iff some element is)."""
    import torch

    return math.sqrt(sum(float(torch.linalg.vector_norm(c, dtype=torch.float64)) ** 2
                         for v in a.values() if v.is_floating_point() for c in slices(v)))
