"""The masking graph of SecAgg+ (Bell et al. 2020, Sec. 3): who pairs with whom.

Classic SecAgg (Bonawitz et al. 2017) masks every pair of the n clients, so each client does
O(n) key agreements and mask expansions. SecAgg+ masks only along the edges of a k-regular
Harary graph H(n, k) laid over a uniformly random permutation of the clients: client at ring
position p is joined to positions p +- 1, ..., p +- floor(k/2), plus the opposite position
p + n/2 when k is odd (which needs n even). The permutation must be random and not chosen by
the server, otherwise it could isolate a victim among colluders.
"""

from __future__ import annotations

import torch


def harary_neighbours(num_clients: int, degree: int, generator: torch.Generator) -> tuple[frozenset[int], ...]:
    """Neighbour sets of a k-regular Harary graph over a random permutation of the clients.

    Args:
        num_clients: n >= 2.
        degree: k, each client's number of neighbours; 1 <= k <= n-1, and k odd needs n even.
            k = n-1 is the complete graph (classic SecAgg).
        generator: source of the random permutation.

    Returns:
        ``out[i]`` is the set of client i's neighbours (never containing i).

    Raises:
        ValueError: if k is not allowed for this n.
    """
    n, k = num_clients, degree
    if not 1 <= k <= n - 1:
        raise ValueError(f"neighbours={k} not allowed with {n} clients: must be in [1, {n - 1}]")
    if k % 2 == 1 and n % 2 == 1:
        raise ValueError(
            f"neighbours={k} not allowed with {n} clients: a k-regular graph needs k or n even; "
            f"use {k - 1} or {k + 1}"
        )
    offsets = list(range(1, k // 2 + 1)) + ([n // 2] if k % 2 else [])
    at = torch.randperm(n, generator=generator).tolist()  # at[position] = client
    where = {c: p for p, c in enumerate(at)}
    return tuple(
        frozenset(at[(where[c] + s * d) % n] for d in offsets for s in (1, -1)) for c in range(n)
    )
