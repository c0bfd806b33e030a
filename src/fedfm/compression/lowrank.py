"""Rank-r factorization by one power-iteration step (PowerSGD, Vogels et al. 2019).

A tensor of shape (m, ...) is viewed as an m x n matrix M (n the product of the other dims).
With Q0 (n x r) Gaussian: P = orth(M Q0) by QR, Q = M^T P, and the server decodes P Q^T, the
projection of M onto span(P). When rank(M) <= r this is exact (P spans M's columns almost surely).

Q0 is drawn fresh from the client's generator each round, so the codec is stateless. PowerSGD's
warm start (reusing last round's Q as Q0) would need no server-side state, since both factors
travel, but it would be per-client state that goes stale while a client is not sampled; fresh
draws avoid that, and the error the single step leaves is carried by
:class:`~fedfm.compression.base.ErrorFeedback` (residual M - P Q^T), which PowerSGD relies on.

Payload per factorized tensor: ``name.P`` (m x r) and ``name.Q`` (n x r), in the tensor's dtype
(computed in float32, or float64 for float64). Only matrices where the factors are strictly
smaller than the matrix, r (m + n) < m n (which implies min(m, n) > r), are factorized; 1-D
tensors, smaller matrices and non-float tensors pass through dense under their own name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fedfm.compression.base import COMPRESSORS, CompressionSettings, meta, put
from fedfm.types import NamedTensors


@COMPRESSORS.register("lowrank")
@dataclass(frozen=True)
class LowRank:
    """Args:
        rank: r, the number of factor columns, >= 1.

    Raises:
        ValueError: for a rank below 1.
    """

    rank: int = 4

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"lowrank rank must be an integer >= 1, got {self.rank!r}")

    @classmethod
    def from_config(cls, cfg: CompressionSettings) -> "LowRank":
        return cls(rank=cfg.rank)

    def encode(
        self, delta: NamedTensors, state: NamedTensors | None, generator: torch.Generator
    ) -> tuple[dict[str, torch.Tensor], None]:
        out: dict[str, torch.Tensor] = {}
        for name, x in delta.items():
            if not self._factorizes(x):
                put(out, name, x)
                continue
            p, q = self._factors(x, generator)
            put(out, f"{name}.P", p)
            put(out, f"{name}.Q", q)
        return out, None

    def decode(self, payload: NamedTensors, like: NamedTensors) -> dict[str, torch.Tensor]:
        out = {}
        for name, ref in like.items():
            if not self._factorizes(ref):
                out[name] = payload[name]
                continue
            cd = _compute_dtype(ref.dtype)
            m = payload[f"{name}.P"].to(cd) @ payload[f"{name}.Q"].to(cd).T
            out[name] = m.reshape(ref.shape).to(ref.dtype)
        return out

    def payload_like(self, like: NamedTensors) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for name, ref in like.items():
            if not self._factorizes(ref):
                put(out, name, meta(ref.shape, ref.dtype))
                continue
            m, n = _matrix_shape(ref.shape)
            put(out, f"{name}.P", meta((m, self.rank), ref.dtype))
            put(out, f"{name}.Q", meta((n, self.rank), ref.dtype))
        return out

    def _factorizes(self, x: torch.Tensor) -> bool:
        if not x.is_floating_point() or x.dim() < 2:
            return False
        m, n = _matrix_shape(x.shape)
        return self.rank * (m + n) < m * n

    def _factors(self, x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        cd = _compute_dtype(x.dtype)
        mat = x.detach().reshape(_matrix_shape(x.shape)).to(cd)
        q0 = torch.randn(mat.shape[1], self.rank, generator=generator, device=generator.device, dtype=cd)
        p = torch.linalg.qr(mat @ q0.to(mat.device)).Q  # reduced QR: m x r, orthonormal columns
        return p.to(x.dtype), (mat.T @ p).to(x.dtype)


def _matrix_shape(shape: torch.Size) -> tuple[int, int]:
    return shape[0], math.prod(shape[1:])


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32
