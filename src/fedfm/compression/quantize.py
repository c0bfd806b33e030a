"""Stochastic uniform quantization with bit packing (QSGD, Alistarh et al. 2017).

Each chunk of ``chunk`` consecutive values (2048 by default) gets its own grid of ``2**bits``
evenly spaced levels from its min to its max; a value is rounded to one of its two neighbouring
levels at random, up with probability equal to its fractional position, so the code is unbiased:
E[decode(encode(x))] = x, with every decoded value within one step of x and inside the chunk's
[min, max] (up to float32 rounding of the grid ends). Per-chunk rather than per-tensor ranges
keep the step small when an outlier sits elsewhere in a large tensor (common in transformer
deltas), for 8 bytes (min and step, float32) per chunk: 0.4% of the 8-bit codes at 2048.

Payload per quantized tensor ``name``: ``name.q`` (uint8, ``8 // bits`` codes per byte, first code
in the low bits), ``name.lo`` and ``name.scale`` (float32, one per chunk). Non-float tensors and
tensors with fewer than ``min_numel`` values pass through unchanged under their own name: for
them the extra header entries would cost more than quantizing saves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fedfm.compression.base import COMPRESSORS, CompressionSettings, meta, put
from fedfm.types import NamedTensors

ALLOWED_BITS = (1, 2, 4, 8)


@COMPRESSORS.register("quantize")
@dataclass(frozen=True)
class Quantize:
    """Args:
        bits: bits per value, one of 1, 2, 4, 8.
        chunk: values sharing one (min, step) grid.
        min_numel: tensors smaller than this pass through unquantized.

    Raises:
        ValueError: for bits outside 1, 2, 4, 8 or a non-positive chunk.
    """

    bits: int = 8
    chunk: int = 2048
    min_numel: int = 256

    def __post_init__(self) -> None:
        if self.bits not in ALLOWED_BITS:
            raise ValueError(f"quantize bits must be one of {list(ALLOWED_BITS)}, got {self.bits!r}")
        if self.chunk < 1:
            raise ValueError(f"quantize chunk must be a positive integer, got {self.chunk!r}")

    @classmethod
    def from_config(cls, cfg: CompressionSettings) -> "Quantize":
        return cls(bits=cfg.bits)

    def encode(
        self, delta: NamedTensors, state: NamedTensors | None, generator: torch.Generator
    ) -> tuple[dict[str, torch.Tensor], None]:
        out: dict[str, torch.Tensor] = {}
        for name, x in delta.items():
            if not self._quantizes(x):
                put(out, name, x)
                continue
            q, lo, scale = self._encode_one(x, generator)
            put(out, f"{name}.q", q)
            put(out, f"{name}.lo", lo)
            put(out, f"{name}.scale", scale)
        return out, None

    def decode(self, payload: NamedTensors, like: NamedTensors) -> dict[str, torch.Tensor]:
        out = {}
        for name, ref in like.items():
            if not self._quantizes(ref):
                out[name] = payload[name]
                continue
            p = (payload[f"{name}.q"], payload[f"{name}.lo"], payload[f"{name}.scale"])
            out[name] = self._decode_one(*p, ref.shape, ref.dtype)
        return out

    def payload_like(self, like: NamedTensors) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for name, ref in like.items():
            if not self._quantizes(ref):
                put(out, name, meta(ref.shape, ref.dtype))
                continue
            chunks = math.ceil(ref.numel() / self.chunk)
            put(out, f"{name}.q", meta((math.ceil(ref.numel() * self.bits / 8),), torch.uint8))
            put(out, f"{name}.lo", meta((chunks,), torch.float32))
            put(out, f"{name}.scale", meta((chunks,), torch.float32))
        return out

    def _quantizes(self, x: torch.Tensor) -> bool:
        return x.is_floating_point() and x.numel() >= max(self.min_numel, 1)

    def _encode_one(self, x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        flat = x.detach().reshape(-1).to(_compute_dtype(x.dtype))
        n, top = flat.numel(), 2**self.bits - 1
        # pad by repeating the last value: it leaves the last chunk's min and max unchanged
        rows = torch.cat([flat, flat[-1:].expand((-n) % self.chunk)]).view(-1, self.chunk)
        mn, mx = rows.aminmax(dim=1)
        lo, scale = mn.float(), ((mx - mn) / top).float()
        # the grid is the float32 (lo, scale) actually sent, so encode and decode agree on it
        step = torch.where(scale > 0, scale, torch.ones_like(scale)).to(rows.dtype)
        u = (rows - lo.to(rows.dtype)[:, None]) / step[:, None]
        noise = torch.rand(u.shape, generator=generator, device=generator.device, dtype=u.dtype).to(u.device)
        codes = torch.floor(u + noise).clamp_(0, top)  # floor(u + U[0,1)) rounds up w.p. frac(u)
        return pack(codes.reshape(-1)[:n].to(torch.uint8), self.bits), lo, scale

    def _decode_one(
        self, q: torch.Tensor, lo: torch.Tensor, scale: torch.Tensor, shape: torch.Size, dtype: torch.dtype
    ) -> torch.Tensor:
        n, cd = math.prod(shape), _compute_dtype(dtype)
        codes = unpack(q, self.bits, n).to(cd)
        rows = torch.nn.functional.pad(codes, (0, (-n) % self.chunk)).view(-1, self.chunk)
        values = lo.to(cd)[:, None] + rows * scale.to(cd)[:, None]
        return values.reshape(-1)[:n].reshape(shape).to(dtype)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack 1-D uint8 codes below ``2**bits`` into bytes, ``8 // bits`` per byte, first in the low bits."""
    per = 8 // bits
    if per == 1:
        return codes.to(torch.uint8)
    padded = torch.nn.functional.pad(codes.to(torch.uint8), (0, (-codes.numel()) % per))
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)
    # the shifted codes occupy disjoint bits, so their sum is their bitwise or
    return (padded.view(-1, per) << shifts).sum(dim=1, dtype=torch.uint8)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack`: the first ``n`` codes, as uint8."""
    per = 8 // bits
    if per == 1:
        return packed[:n]
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    return ((packed[:, None] >> shifts) & (2**bits - 1)).reshape(-1)[:n]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32
