"""Partitioners: pure, seeded functions from labels (and groups) to client index lists.

Every partitioner returns one int64 index array per client; together they are
disjoint and cover every example (checked by tests/contracts/test_partitioners.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Protocol

import numpy as np

from fedfm.errors import DataError
from fedfm.registry import Registry

if TYPE_CHECKING:
    from fedfm.config import PartitionConfig


class Partitioner(Protocol):
    def __call__(
        self,
        labels: np.ndarray,
        groups: Optional[np.ndarray],
        num_clients: int,
        rng: np.random.Generator,
        cfg: "PartitionConfig",
    ) -> list[np.ndarray]: ...


PARTITIONERS: Registry[Partitioner] = Registry("partition method")


def partition(
    labels: np.ndarray, groups: Optional[np.ndarray], num_clients: int, seed: int, cfg: "PartitionConfig"
) -> list[np.ndarray]:
    """Split example indices over ``num_clients`` with the method ``cfg.method``.

    Raises:
        DataError: fewer examples than clients, or the method cannot give every client data.
    """
    if len(labels) < num_clients:
        raise DataError(
            f"the training set has {len(labels)} examples but federation.clients={num_clients}; "
            "every client needs at least one example: lower federation.clients or raise data.max_examples"
        )
    rng = np.random.default_rng([seed, 0x9A27])
    parts = PARTITIONERS.get(cfg.method)(labels, groups, num_clients, rng, cfg)
    return [np.sort(p).astype(np.int64) for p in parts]


@PARTITIONERS.register("iid")
def iid(labels, groups, num_clients, rng, cfg):  # type: ignore[no-untyped-def]
    """Uniformly random, equal-size (up to one example) shares."""
    return np.array_split(rng.permutation(len(labels)), num_clients)


@PARTITIONERS.register("dirichlet")
def dirichlet(labels, groups, num_clients, rng, cfg):  # type: ignore[no-untyped-def]
    """Label skew: each class is split over clients by proportions ~ Dir(alpha)
    (Hsu et al. 2019). Resampled until every client has ``min_size`` examples."""
    need = max(cfg.min_size, 1)
    for _ in range(1000):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for c in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == c))
            props = rng.dirichlet(np.full(num_clients, cfg.alpha))
            cuts = (np.cumsum(props)[:-1] * len(idx)).astype(int)
            for client, chunk in enumerate(np.split(idx, cuts)):
                parts[client].extend(chunk.tolist())
        if min(len(p) for p in parts) >= need:
            return [np.array(p, dtype=np.int64) for p in parts]
    raise DataError(
        f"dirichlet partition with alpha={cfg.alpha} could not give all {num_clients} clients "
        f"at least {need} examples in 1000 draws; raise partition.alpha or lower partition.min_size"
    )


@PARTITIONERS.register("shards")
def shards(labels, groups, num_clients, rng, cfg):  # type: ignore[no-untyped-def]
    """Pathological non-IID (McMahan et al. 2017): single-class shards, k per client,
    so a client holds at most k classes (exactly k where the shards allow it)."""
    k = cfg.shards_per_client
    pool = _single_class_shards(labels, num_clients * k, rng)
    order = [int(i) for i in rng.permutation(len(pool))]
    parts = []
    for _ in range(num_clients):
        chosen: list[int] = []
        for distinct in (True, False):  # prefer shards of classes the client lacks
            for i in [i for i in order if i not in chosen]:
                if len(chosen) == k:
                    break
                if not distinct or all(pool[i][0] != pool[j][0] for j in chosen):
                    chosen.append(i)
        order = [i for i in order if i not in chosen]
        parts.append(np.concatenate([pool[i][1] for i in chosen]))
    return parts


def _single_class_shards(labels: np.ndarray, total: int, rng: np.random.Generator) -> list:
    classes, counts = np.unique(labels, return_counts=True)
    if total < len(classes):
        raise DataError(
            f"shards: {total} shards (clients x shards_per_client) cannot cover {len(classes)} classes; "
            "raise partition.shards_per_client or federation.clients"
        )
    # Largest-remainder allocation of shards to classes, at least one each.
    alloc = np.maximum(1, np.floor(counts / counts.sum() * total)).astype(int)
    while alloc.sum() > total:
        alloc[np.argmax(alloc)] -= 1
    order = np.argsort(-(counts / counts.sum() * total - alloc), kind="stable")
    for i in range(total - alloc.sum()):
        alloc[order[i % len(order)]] += 1
    if np.any(alloc > counts):
        raise DataError("shards: more shards than examples in a class; lower shards_per_client or clients")
    pool = []
    for c, n in zip(classes, alloc):
        idx = rng.permutation(np.flatnonzero(labels == c))
        pool.extend((int(c), chunk) for chunk in np.array_split(idx, n))
    return pool


@PARTITIONERS.register("natural")
def natural(labels, groups, num_clients, rng, cfg):  # type: ignore[no-untyped-def]
    """By a natural group (movie, author, domain): groups never split across clients.
    With more groups than clients, groups are dealt in seeded random order to the
    client holding the fewest examples so far (balanced sizes)."""
    if groups is None:
        raise DataError(
            "partition.method='natural' needs a group per example; this dataset has none "
            "(bundled: rotten-tomatoes groups by movie; local files: set data.group_column)"
        )
    ids, sizes = np.unique(groups, return_counts=True)
    if len(ids) < num_clients:
        raise DataError(
            f"natural partition: {len(ids)} groups cannot fill federation.clients={num_clients}; "
            f"allowed: clients <= {len(ids)}"
        )
    members: list[list[int]] = [[] for _ in range(num_clients)]
    load = np.zeros(num_clients, dtype=np.int64)
    for j in rng.permutation(len(ids)):
        target = int(np.argmin(load))
        members[target].append(int(ids[j]))
        load[target] += sizes[j]
    return [np.flatnonzero(np.isin(groups, m)) for m in members]
