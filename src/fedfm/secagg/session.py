"""Public parameters of one secure aggregation: config, masking graph, threshold, encoding.

Everything here is known to the server and every client; nothing is secret.

Threshold choice. Each client's secrets are Shamir-shared among its m holders: itself and its
k neighbours (m = n in classic SecAgg). We use

    t = max(m - floor(max_dropout * m), floor(m / 2) + 1, 2)

``m - floor(max_dropout * m)`` lets up to a ``max_dropout`` fraction of the holders drop while
t of them still answer. ``t > m / 2`` is the condition of Bonawitz et al. 2017 (Sec. 4, and
Bell et al. 2020 for neighbourhoods): two disjoint groups of holders cannot both reach t, so
a server that tells some clients "i survived" and others "i dropped" can never collect t
shares of both client i's self-mask seed and its mask key. Because ``max_dropout < 0.5`` is
required, the first term already satisfies the other two; they are kept as a guard.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fedfm.secagg.graph import harary_neighbours
from fedfm.secagg.quantize import MAX_BITS, MIN_BITS, FixedPoint


class SecAggError(ValueError):
    """The aggregation cannot be completed correctly (too few survivors or shares, a protocol
    violation); raised instead of ever returning a wrong sum."""


@dataclass(frozen=True)
class SecAggConfig:
    """How one secure aggregation runs.

    Attributes:
        bits: the ring is Z_{2^bits}; allowed 16..62.
        clip_range: coordinates (after weighting) are clipped to [-clip_range, clip_range].
        max_dropout: fraction of share holders that may drop, in [0, 0.5).
        neighbours: k, the number of clients each client masks with (SecAgg+, Bell et al. 2020);
            None means all others (classic SecAgg). Smaller k cuts client work from O(n) to
            O(k) key agreements and mask expansions, and server work from O(n^2) to O(n k),
            but privacy and dropout tolerance become probabilistic: they hold only while no
            neighbourhood loses more than ``max_dropout`` of its members or is dominated by
            colluders, which Bell et al. show needs k = O(log n) (a few dozen in practice).
        levels: integer units per ``clip_range``; None picks the finest encoding for which the
            sum over all clients cannot wrap around.

    Raises:
        ValueError: if a field is outside its allowed range.
    """

    bits: int = 32
    clip_range: float = 1.0
    max_dropout: float = 0.3
    neighbours: int | None = None
    levels: int | None = None

    def __post_init__(self) -> None:
        if not MIN_BITS <= self.bits <= MAX_BITS:
            raise ValueError(f"bits={self.bits} not allowed: must be in [{MIN_BITS}, {MAX_BITS}]")
        if not self.clip_range > 0 or not math.isfinite(self.clip_range):
            raise ValueError(f"clip_range={self.clip_range} not allowed: must be a finite number > 0")
        if not 0 <= self.max_dropout < 0.5:
            raise ValueError(
                f"max_dropout={self.max_dropout} not allowed: must be in [0, 0.5), because the "
                "Shamir threshold must exceed half the share holders (Bonawitz et al. 2017)"
            )
        if self.neighbours is not None and self.neighbours < 1:
            raise ValueError(f"neighbours={self.neighbours} not allowed: must be >= 1 or None (all clients)")
        if self.levels is not None and self.levels < 1:
            raise ValueError(f"levels={self.levels} not allowed: must be >= 1 or None (finest that fits)")


def threshold(num_holders: int, max_dropout: float) -> int:
    """Shamir threshold t for ``num_holders`` holders (see the module docstring)."""
    tolerated = math.floor(max_dropout * num_holders + 1e-9)  # 1e-9: 0.29 * 100 must give 29
    return max(num_holders - tolerated, num_holders // 2 + 1, 2)


@dataclass(frozen=True)
class Session:
    """The public plan of one aggregation among clients 0..num_clients-1.

    Attributes:
        config: the configuration.
        num_clients: n, the clients that advertised keys.
        neighbours: ``neighbours[i]`` are the clients i masks with (never i itself).
        codec: the fixed-point encoding every client uses.
    """

    config: SecAggConfig
    num_clients: int
    neighbours: tuple[frozenset[int], ...]
    codec: FixedPoint

    @classmethod
    def create(cls, num_clients: int, config: SecAggConfig, seed: int) -> "Session":
        """Draw the masking graph from ``seed`` and fix the encoding.

        The seed must not be the server's free choice in deployment (Bell et al. 2020): derive it
        from public randomness or a commit-and-reveal among the clients.

        Raises:
            ValueError: if there are fewer than 2 clients, ``neighbours`` does not fit n, or
                n clients' sum could overflow the ring (naming bits, n and the range).
        """
        if num_clients < 2:
            raise ValueError(f"secure aggregation needs at least 2 clients, got {num_clients}")
        k = num_clients - 1 if config.neighbours is None else config.neighbours
        graph = harary_neighbours(num_clients, k, torch.Generator().manual_seed(seed))
        if config.levels is None:
            codec = FixedPoint.for_summands(config.bits, config.clip_range, num_clients)
        else:
            codec = FixedPoint(config.bits, config.clip_range, config.levels)
        codec.check_capacity(num_clients)
        return cls(config, num_clients, graph, codec)

    @property
    def degree(self) -> int:
        """k, each client's number of neighbours."""
        return len(self.neighbours[0])

    @property
    def threshold(self) -> int:
        """t, the shares needed to reconstruct any client's secret (out of k + 1 holders)."""
        return threshold(self.degree + 1, self.config.max_dropout)

    def holders(self, client_id: int) -> tuple[int, ...]:
        """Who holds shares of ``client_id``'s secrets: itself and its neighbours, sorted."""
        return tuple(sorted(self.neighbours[client_id] | {client_id}))
