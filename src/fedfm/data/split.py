"""Deduplication and the held-out test split."""

from __future__ import annotations

import numpy as np

from fedfm.data.base import LabeledTexts
from fedfm.errors import DataError


def dedupe(data: LabeledTexts) -> LabeledTexts:
    """Keep the first occurrence of each example (texts compared after case/whitespace folding,
    images by pixel digest), so an example can never sit both in training and in the test set."""
    seen: set[str] = set()
    keep = []
    for i, key in enumerate(data.keys()):
        if key not in seen:
            seen.add(key)
            keep.append(i)
    return data.subset(np.array(keep, dtype=np.int64))


def train_test_split(
    data: LabeledTexts, fraction: float, by_group: bool, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split into (train, test) indices; ``by_group`` holds out whole groups.

    Raises:
        DataError: by_group without groups, or a split that leaves a side empty.
    """
    rng = np.random.default_rng([seed, 0x7E57])
    n = len(data)
    if by_group:
        if data.groups is None:
            raise DataError("data.test_by_group=true needs a dataset with groups (set data.group_column)")
        ids = rng.permutation(np.unique(data.groups))
        n_test = max(1, int(round(fraction * len(ids))))
        test_mask = np.isin(data.groups, ids[:n_test])
    else:
        test_mask = np.zeros(n, dtype=bool)
        test_mask[rng.permutation(n)[: max(1, int(round(fraction * n)))]] = True
    train, test = np.flatnonzero(~test_mask), np.flatnonzero(test_mask)
    if len(train) == 0 or len(test) == 0:
        raise DataError(f"data.test_fraction={fraction} leaves {len(train)} train / {len(test)} test examples")
    return train, test
