"""Top-k sparsification: send only the largest-magnitude coordinates of each tensor.

Top-k is biased (the small coordinates never arrive), which is why it is meant to run under
:class:`~fedfm.compression.base.ErrorFeedback` (Stich et al. 2018, "Sparsified SGD with memory";
Karimireddy et al. 2019, EF-SGD): the dropped mass stays in the client's residual and is sent in
a later round. Wrapped that way the residual is exactly ``(delta + residual) - sent``.

Per float tensor of ``n`` values, ``k = max(1, floor(fraction * n))`` coordinates are sent (the
product is taken in exact decimal arithmetic on the fraction as written, so 0.29 * 100 is 29):
``name.idx`` (int32, ascending flat indices) and ``name.val`` (the values, in the tensor's
dtype). Non-float tensors pass through unchanged under their own name.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

import torch

from fedfm.compression.base import COMPRESSORS, CompressionSettings, meta, put
from fedfm.types import NamedTensors


@COMPRESSORS.register("topk")
@dataclass(frozen=True)
class TopK:
    """Args:
        fraction: share of each tensor's coordinates sent, in (0, 1].

    Raises:
        ValueError: for a fraction outside (0, 1].
    """

    fraction: float = 0.01

    def __post_init__(self) -> None:
        if not 0 < self.fraction <= 1:
            raise ValueError(f"top-k fraction must be in (0, 1], got {self.fraction!r}")

    @classmethod
    def from_config(cls, cfg: CompressionSettings) -> "TopK":
        return cls(fraction=cfg.fraction)

    def k(self, numel: int) -> int:
        """How many of ``numel`` coordinates are sent: max(1, floor(fraction * numel))."""
        return max(1, int(Decimal(repr(float(self.fraction))) * numel))

    def encode(
        self, delta: NamedTensors, state: NamedTensors | None, generator: torch.Generator
    ) -> tuple[dict[str, torch.Tensor], None]:
        out: dict[str, torch.Tensor] = {}
        for name, x in delta.items():
            if not _sparsifies(x):
                put(out, name, x)
                continue
            flat = x.detach().reshape(-1)
            idx = torch.topk(flat.abs(), self.k(flat.numel()), sorted=False).indices.sort().values
            put(out, f"{name}.idx", idx.to(torch.int32))
            put(out, f"{name}.val", flat[idx])
        return out, None

    def decode(self, payload: NamedTensors, like: NamedTensors) -> dict[str, torch.Tensor]:
        out = {}
        for name, ref in like.items():
            if not _sparsifies(ref):
                out[name] = payload[name]
                continue
            val = payload[f"{name}.val"]
            dense = torch.zeros(ref.numel(), dtype=ref.dtype, device=val.device)
            dense[payload[f"{name}.idx"].long()] = val.to(ref.dtype)
            out[name] = dense.view(ref.shape)
        return out

    def payload_like(self, like: NamedTensors) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for name, ref in like.items():
            if not _sparsifies(ref):
                put(out, name, meta(ref.shape, ref.dtype))
                continue
            k = self.k(ref.numel())
            put(out, f"{name}.idx", meta((k,), torch.int32))
            put(out, f"{name}.val", meta((k,), ref.dtype))
        return out


def _sparsifies(x: torch.Tensor) -> bool:
    if x.numel() >= 2**31:
        raise ValueError(f"top-k indices are int32; a tensor of {x.numel()} values is too large")
    return x.is_floating_point() and x.numel() > 0
