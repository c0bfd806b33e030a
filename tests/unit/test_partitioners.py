"""Statistical and structural properties of each partitioner."""

from __future__ import annotations

import numpy as np
import pytest

from fedfm.config import PartitionConfig
from fedfm.data.partition import partition
from fedfm.errors import DataError

RNG = np.random.default_rng(42)
LABELS = np.repeat(np.arange(10), 300)  # 3,000 examples, 10 balanced classes


def _label_shares(parts):
    return np.array([np.bincount(LABELS[p], minlength=10) / len(p) for p in parts])


def test_dirichlet_large_alpha_is_close_to_iid():
    parts = partition(LABELS, None, 10, 0, PartitionConfig(method="dirichlet", alpha=1000.0))
    # each client's label share ~ 0.1; with ~300 examples the sampling sd is ~0.017
    assert np.abs(_label_shares(parts) - 0.1).max() < 0.08


def test_dirichlet_small_alpha_is_skewed():
    parts = partition(LABELS, None, 10, 0, PartitionConfig(method="dirichlet", alpha=0.05))
    dominant = _label_shares(parts).max(axis=1)
    assert dominant.mean() > 0.6  # IID would give ~0.1-0.15


def test_dirichlet_skew_decreases_with_alpha():
    def skew(a):
        return np.mean([_label_shares(partition(LABELS, None, 10, s, PartitionConfig(method="dirichlet", alpha=a))).max(1).mean()
                        for s in range(5)])

    assert skew(0.1) > skew(1.0) > skew(100.0)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_shards_give_k_classes_per_client(k):
    parts = partition(LABELS, None, 10, 0, PartitionConfig(method="shards", shards_per_client=k))
    classes = [len(np.unique(LABELS[p])) for p in parts]
    assert classes == [k] * 10


def test_shards_at_most_k_classes_with_unbalanced_labels():
    labels = np.random.default_rng(3).choice(4, 999, p=[0.5, 0.3, 0.15, 0.05])
    parts = partition(labels, None, 7, 0, PartitionConfig(method="shards", shards_per_client=2))
    assert all(len(np.unique(labels[p])) <= 2 for p in parts)


def test_natural_keeps_groups_whole_and_balanced():
    groups = RNG.integers(0, 100, 3000)
    parts = partition(LABELS, groups, 10, 0, PartitionConfig(method="natural"))
    owner = {}
    for c, p in enumerate(parts):
        for g in np.unique(groups[p]):
            assert owner.setdefault(int(g), c) == c
    sizes = [len(p) for p in parts]
    assert max(sizes) < 1.5 * min(sizes)


def test_natural_needs_groups():
    with pytest.raises(DataError, match="needs a group"):
        partition(LABELS, None, 10, 0, PartitionConfig(method="natural"))


def test_natural_needs_enough_groups():
    with pytest.raises(DataError, match="groups cannot fill"):
        partition(LABELS, np.zeros(3000, dtype=np.int64), 10, 0, PartitionConfig(method="natural"))


def test_iid_sizes_equal():
    sizes = [len(p) for p in partition(LABELS, None, 7, 0, PartitionConfig(method="iid"))]
    assert max(sizes) - min(sizes) <= 1
