"""In-memory labelled text data, the common form every source returns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np


@dataclass(frozen=True)
class LabeledTexts:
    """Texts with integer labels and an optional natural group per example.

    Attributes:
        name: where the data came from.
        texts: one string per example.
        labels: int64 class index per example.
        label_names: class index -> name.
        groups: int64 group index per example (e.g. the movie), for natural partitions.
        group_names: group index -> name.
    """

    name: str
    texts: list[str]
    labels: np.ndarray
    label_names: list[str]
    groups: Optional[np.ndarray] = None
    group_names: Optional[list[str]] = None

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, idx: np.ndarray) -> "LabeledTexts":
        return LabeledTexts(
            name=self.name,
            texts=[self.texts[i] for i in idx],
            labels=self.labels[idx],
            label_names=self.label_names,
            groups=None if self.groups is None else self.groups[idx],
            group_names=self.group_names,
        )

    @property
    def num_classes(self) -> int:
        return len(self.label_names)


def encode_column(values: list[str]) -> tuple[np.ndarray, list[str]]:
    """Map string values to int codes in sorted-name order (stable across runs)."""
    names = sorted(set(values))
    index = {n: i for i, n in enumerate(names)}
    return np.array([index[v] for v in values], dtype=np.int64), names
