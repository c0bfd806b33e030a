"""Every registered partitioner: disjoint, complete, seeded, no empty client."""

from __future__ import annotations

import numpy as np
import pytest

from fedfm.config import PartitionConfig
from fedfm.data.partition import PARTITIONERS, partition

N, K, CLIENTS = 1000, 5, 10
LABELS = np.random.default_rng(0).integers(0, K, N)
GROUPS = np.random.default_rng(1).integers(0, 40, N)


@pytest.fixture(params=PARTITIONERS.names())
def method(request):
    return request.param


def _split(method, seed=0):
    return partition(LABELS, GROUPS, CLIENTS, seed, PartitionConfig(method=method, alpha=0.5, shards_per_client=2))


def test_disjoint_and_complete(method):
    parts = _split(method)
    assert len(parts) == CLIENTS
    allidx = np.concatenate(parts)
    assert len(allidx) == N and len(np.unique(allidx)) == N


def test_no_empty_client(method):
    assert min(len(p) for p in _split(method)) > 0


def test_seeded(method):
    a, b, c = _split(method, 0), _split(method, 0), _split(method, 1)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_fewer_examples_than_clients_refused(method):
    from fedfm.errors import DataError

    with pytest.raises(DataError, match="at least one example"):
        partition(LABELS[:5], GROUPS[:5], CLIENTS, 0, PartitionConfig(method=method))
