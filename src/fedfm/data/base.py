"""In-memory labelled text data, the common form every source returns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from fedfm.errors import DataError


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

    def keys(self) -> list[str]:
        """Normalized texts (case and whitespace folded): what deduplication compares."""
        return [" ".join(t.lower().split()) for t in self.texts]


def concat(parts: list[LabeledTexts]) -> LabeledTexts:
    """One pool from several sources; label indices must mean the same class in each (checked by
    count), label names come from the first part, group codes are offset per part."""
    first = parts[0]
    if any(type(p) is not type(first) for p in parts):
        raise DataError(f"cannot mix {', '.join(type(p).__name__ for p in parts)} in one experiment: "
                        "public, private and test data must all be text or all be images")
    if not isinstance(first, LabeledTexts):  # images
        from fedfm.data.corpora import LabeledImages

        return LabeledImages(name="+".join(p.name for p in parts), images=np.concatenate([p.images for p in parts]),
                             labels=np.concatenate([p.labels for p in parts]), label_names=first.label_names,
                             is_test=np.concatenate([p.is_test for p in parts]))
    for p in parts[1:]:
        if p.num_classes != first.num_classes:
            raise DataError(
                f"dataset {p.name!r} has {p.num_classes} classes ({', '.join(p.label_names)}) but "
                f"{first.name!r} has {first.num_classes} ({', '.join(first.label_names)}); label indices must align"
            )
    groups, names, offset = [], [], 0
    for p in parts:
        g = p.groups if p.groups is not None else np.zeros(len(p), dtype=np.int64)
        groups.append(g + offset)
        gn = p.group_names if p.group_names is not None else ["all"]
        names += [f"{p.name}:{n}" for n in gn]
        offset += len(gn)
    return LabeledTexts(
        name="+".join(p.name for p in parts),
        texts=[t for p in parts for t in p.texts],
        labels=np.concatenate([p.labels for p in parts]),
        label_names=first.label_names,
        groups=np.concatenate(groups),
        group_names=names,
    )


def encode_column(values: list[str]) -> tuple[np.ndarray, list[str]]:
    """Map string values to int codes in sorted-name order (stable across runs)."""
    names = sorted(set(values))
    index = {n: i for i, n in enumerate(names)}
    return np.array([index[v] for v in values], dtype=np.int64), names
