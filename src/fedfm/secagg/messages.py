"""What travels in each round of the protocol (Bonawitz et al. 2017, Fig. 4, rounds 1-4).

In this simulation-ready module share bundles travel in the clear through the server. A
deployment must encrypt each bundle for its holder (authenticated encryption under a key from
a second X25519 agreement, as in the paper's round 1); otherwise the server reads every share.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from fedfm.secagg.session import SecAggError
from fedfm.secagg.shamir import Share


@dataclass(frozen=True)
class ShareBundle:
    """Round 1: the shares of ``owner``'s two secrets that ``holder`` keeps.

    Attributes:
        owner: whose secrets these are.
        holder: who keeps this bundle.
        self_seed: share of the owner's self-mask seed b_owner.
        mask_key: share of the owner's X25519 mask private key.
    """

    owner: int
    holder: int
    self_seed: Share
    mask_key: Share


@dataclass(frozen=True)
class MaskedInput:
    """Round 2: a client's masked, encoded vector and its weight (sent in the clear).

    Attributes:
        client_id: the sender.
        vector: int64 residues mod 2^bits; uniformly distributed to anyone without the masks.
        weight: the weight the vector was multiplied by before encoding.
    """

    client_id: int
    vector: torch.Tensor
    weight: float


@dataclass(frozen=True)
class UnmaskRequest:
    """Round 3 (server -> survivors): whose self-mask seeds and whose mask keys to reveal.

    Attributes:
        survivors: clients whose masked input arrived; holders reveal their self-seed shares.
        dropped: clients whose input did not arrive; holders reveal their mask-key shares.

    Raises:
        SecAggError: if a client is in both sets; revealing both secrets of one client would
            let the server unmask that client's individual input.
    """

    survivors: frozenset[int]
    dropped: frozenset[int]

    def __post_init__(self) -> None:
        check_disjoint(self.survivors, self.dropped)


@dataclass(frozen=True)
class UnmaskResponse:
    """Round 3 (holder -> server): the requested shares, keyed by owner.

    Attributes:
        holder: the responding client.
        self_seeds: shares of survivors' self-mask seeds.
        mask_keys: shares of dropped clients' mask keys.
    """

    holder: int
    self_seeds: Mapping[int, Share]
    mask_keys: Mapping[int, Share]


@dataclass(frozen=True)
class AggregateResult:
    """The server's output.

    Attributes:
        int_sum: exact sum mod 2^bits of the survivors' encoded vectors (int64).
        total: its decoding, the float64 sum of weight_i * vector_i (up to quantization).
        weight_sum: sum of the survivors' weights.
        survivors: whose inputs are in the sum, sorted.
    """

    int_sum: torch.Tensor
    total: torch.Tensor
    weight_sum: float
    survivors: tuple[int, ...]

    def mean(self) -> torch.Tensor:
        """total / weight_sum, the weighted mean (FedAvg's aggregate)."""
        if self.weight_sum <= 0:
            raise SecAggError(f"weights of the survivors sum to {self.weight_sum}; need a positive total")
        return self.total / self.weight_sum


def check_disjoint(survivors: "frozenset[int] | set[int]", dropped: "frozenset[int] | set[int]") -> None:
    """The protocol invariant: no client is both a survivor and dropped.

    Raises:
        SecAggError: naming the clients in both sets.
    """
    both = sorted(set(survivors) & set(dropped))
    if both:
        raise SecAggError(
            f"clients {both} are listed as both survived and dropped; revealing both the self-mask "
            "seed and the mask key of a client would expose its individual input, so this is refused"
        )
