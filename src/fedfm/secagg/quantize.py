"""Fixed-point encoding of float vectors into Z_{2^bits}, the ring secure aggregation sums in.

Masks only cancel exactly in a finite ring, so every client maps its float vector to integers
mod 2^bits before masking (Bonawitz et al. 2017, Sec. 3; Bell et al. 2020, Sec. 2). Each
coordinate is clipped to [-clip_range, clip_range], scaled so that clip_range becomes ``levels``
integer units, and rounded *stochastically* (up with probability equal to the fractional part),
which keeps the encoding unbiased: E[decode(encode(x))] = clip(x). Negative integers are stored
as their residue mod 2^bits (two's complement); the server reads the sum back as a signed
number, which is exact as long as the true sum cannot wrap around, i.e. as long as
``num_summands * levels < 2^(bits-1)``.

All arithmetic is on int64 with bits <= 62, so adding two residues (each < 2^62) never
overflows int64 before the result is reduced again.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MIN_BITS = 16
MAX_BITS = 62


def reduce(x: torch.Tensor, bits: int) -> torch.Tensor:
    """x mod 2^bits for int64 ``x`` (also for negative x, via two's complement masking)."""
    return torch.bitwise_and(x, (1 << bits) - 1)


def max_levels(bits: int, num_summands: int) -> int:
    """The largest ``levels`` whose sum over ``num_summands`` clients cannot wrap around."""
    return ((1 << (bits - 1)) - 1) // num_summands


@dataclass(frozen=True)
class FixedPoint:
    """Unbiased stochastic fixed-point encoding into Z_{2^bits}.

    Attributes:
        bits: ring size exponent; integers live in [0, 2^bits). Allowed: 16..62.
        clip_range: each coordinate is clipped to [-clip_range, clip_range] (> 0).
        levels: integer units that ``clip_range`` maps to; the quantization step is
            ``clip_range / levels``. Use :meth:`for_summands` for the finest step that still
            lets a given number of clients be summed without wrap-around.

    Raises:
        ValueError: if a field is outside its allowed range.
    """

    bits: int = 32
    clip_range: float = 1.0
    levels: int = 1 << 16

    def __post_init__(self) -> None:
        if not MIN_BITS <= self.bits <= MAX_BITS:
            raise ValueError(
                f"bits={self.bits} not allowed: must be in [{MIN_BITS}, {MAX_BITS}] "
                "(int64 arithmetic needs bits <= 62; fewer than 16 bits leaves too little precision)"
            )
        if not self.clip_range > 0:
            raise ValueError(f"clip_range={self.clip_range} not allowed: must be > 0")
        if not 1 <= self.levels < 1 << (self.bits - 1):
            raise ValueError(f"levels={self.levels} not allowed: must be in [1, 2^(bits-1)) with bits={self.bits}")

    @classmethod
    def for_summands(cls, bits: int, clip_range: float, num_summands: int) -> "FixedPoint":
        """The finest encoding whose sum over ``num_summands`` values cannot wrap around."""
        levels = max_levels(bits, num_summands) if num_summands >= 1 else 0
        if levels < 1:
            raise ValueError(f"bits={bits} is too small to sum {num_summands} values; increase bits")
        return cls(bits=bits, clip_range=clip_range, levels=levels)

    @property
    def modulus(self) -> int:
        return 1 << self.bits

    @property
    def step(self) -> float:
        """Quantization step: the float value of one integer unit."""
        return self.clip_range / self.levels

    def check_capacity(self, num_summands: int) -> None:
        """Raise unless the sum of ``num_summands`` encoded values is decodable without wrap-around.

        Raises:
            ValueError: naming bits, the number of summands and the integer range, if
                ``num_summands * levels >= 2^(bits-1)``.
        """
        if num_summands * self.levels >= 1 << (self.bits - 1):
            raise ValueError(
                f"sum would overflow: {num_summands} clients x integer range [-{self.levels}, {self.levels}] "
                f"needs {num_summands} * {self.levels} < 2^(bits-1) = {1 << (self.bits - 1)} with bits={self.bits}; "
                f"increase bits or lower levels to at most {max_levels(self.bits, num_summands)}"
            )

    def quantize(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Clip, scale and stochastically round a float vector into residues mod 2^bits.

        Args:
            x: float tensor (any shape; the result has the same shape).
            generator: source of the rounding randomness.

        Returns:
            int64 tensor with values in [0, 2^bits).
        """
        scaled = x.to(torch.float64).clamp(-self.clip_range, self.clip_range) * (self.levels / self.clip_range)
        low = torch.floor(scaled)
        up = torch.rand(scaled.shape, generator=generator, dtype=torch.float64) < (scaled - low)
        q = low.to(torch.int64) + up.to(torch.int64)
        return reduce(q.clamp(-self.levels, self.levels), self.bits)

    def dequantize_sum(self, total: torch.Tensor, num_summands: int) -> torch.Tensor:
        """Decode the mod-2^bits sum of ``num_summands`` encoded vectors to a float64 sum.

        Raises:
            ValueError: if that many summands could have wrapped around (see check_capacity).
        """
        self.check_capacity(num_summands)
        total = reduce(total, self.bits)
        signed = torch.where(total >= 1 << (self.bits - 1), total - self.modulus, total)
        return signed.to(torch.float64) * self.step
