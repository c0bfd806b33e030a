"""NamedTensors <-> one flat float64 vector, the shape secure aggregation masks.

The layout (names, shapes, dtypes in wire order) is public: the server needs it to unflatten
the aggregate, and it reveals nothing about any client's values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from fedfm.types import NamedTensors


@dataclass(frozen=True)
class Layout:
    """Where each named tensor sits in the flat vector.

    Attributes:
        entries: (name, shape, dtype) per tensor, in the mapping's order.
    """

    entries: tuple[tuple[str, tuple[int, ...], torch.dtype], ...]

    @property
    def numel(self) -> int:
        return sum(_numel(shape) for _, shape, _ in self.entries)


def _numel(shape: tuple[int, ...]) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


def flatten(tensors: "NamedTensors") -> tuple[torch.Tensor, Layout]:
    """Concatenate floating-point tensors, in mapping order, into one float64 vector.

    Raises:
        ValueError: if a tensor is not floating point (its values would not survive the
            float encoding).
    """
    bad = [name for name, t in tensors.items() if not t.is_floating_point()]
    if bad:
        raise ValueError(f"secure aggregation needs floating-point tensors; not floating: {bad}")
    layout = Layout(tuple((name, tuple(t.shape), t.dtype) for name, t in tensors.items()))
    parts = [t.detach().reshape(-1).to(torch.float64) for t in tensors.values()]
    vec = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)
    return vec, layout


def unflatten(vector: torch.Tensor, layout: Layout) -> dict[str, torch.Tensor]:
    """Split a flat vector back into named tensors with the layout's shapes and dtypes.

    Raises:
        ValueError: if the vector's length does not match the layout.
    """
    if vector.dim() != 1 or vector.numel() != layout.numel:
        raise ValueError(f"vector of shape {tuple(vector.shape)} does not match a layout of {layout.numel} elements")
    out, start = {}, 0
    for name, shape, dtype in layout.entries:
        size = _numel(shape)
        out[name] = vector[start : start + size].reshape(shape).to(dtype)
        start += size
    return out
