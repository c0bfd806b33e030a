"""Data roles of an FFM experiment: private data partitioned over clients, public data
at the server, and a test set, all as index sets into one pool.

No text is ever in two roles: sources are deduplicated, then texts of the test set are
removed from training sources and texts of the private data from the public data
(e.g. VADER's movie snippets overlap Rotten Tomatoes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import numpy as np

from fedfm.data.base import LabeledTexts, concat
from fedfm.data.partition import partition
from fedfm.data.sources import load_source
from fedfm.data.split import dedupe, train_test_split
from fedfm.errors import DataError

if TYPE_CHECKING:
    from fedfm.config import ExperimentConfig


@dataclass(frozen=True)
class DataRoles:
    """Index sets into ``pool``.

    Attributes:
        pool: every example of every role.
        train: per-client training indices.
        val: per-client validation indices (empty when no validation is held out).
        local_test: per-client test indices when eval.per_client, else None.
        test: the global test set.
        public: the server's public data, or None.
    """

    pool: LabeledTexts
    train: list[np.ndarray]
    val: list[np.ndarray]
    local_test: Optional[list[np.ndarray]]
    test: np.ndarray
    public: Optional[np.ndarray]

    @property
    def label_names(self) -> list[str]:
        return self.pool.label_names

    @property
    def val_all(self) -> np.ndarray:
        return np.sort(np.concatenate(self.val)) if self.val else np.zeros(0, dtype=np.int64)


def prepare_roles(cfg: "ExperimentConfig") -> DataRoles:
    """Load, deduplicate, subsample, split and partition every role of ``cfg``."""
    d, seed = cfg.data, cfg.seed
    private = _load(cfg, cfg.private_data, d.max_examples, 0xDA7A)
    test_ds = _load(cfg, d.test, None, 0) if d.test else None
    if test_ds is not None:
        private = _without(private, set(test_ds.keys()))
    public_ds = None
    if d.public and d.public != "share":
        public_ds = _load(cfg, d.public, d.public_max_examples, 0x9B1C)
        taken = set(private.keys()) | (set(test_ds.keys()) if test_ds is not None else set())
        public_ds = _without(public_ds, taken)
    parts = [private] + [p for p in (public_ds, test_ds) if p is not None]
    pool = concat(parts) if len(parts) > 1 else private
    n_priv = len(private)
    if test_ds is None:
        train, test = train_test_split(private, d.test_fraction, d.test_by_group, seed)
    else:
        train, test = np.arange(n_priv), np.arange(len(pool) - len(test_ds), len(pool))
    public = None
    if d.public == "share":
        train, public = _take_share(train, d.public_fraction, d.public_max_examples, seed)
    elif public_ds is not None:
        public = np.arange(n_priv, n_priv + len(public_ds))
    if cfg.paradigm == "pooled":  # the upper bound: the server sees all training data
        public = np.sort(np.concatenate([train] + ([public] if public is not None else [])))
    elif cfg.paradigm == "fl":
        public = None
    if cfg.eval.max_examples is not None and cfg.eval.max_examples < len(test):
        test = np.sort(np.random.default_rng([seed, 0xE7A1]).choice(test, cfg.eval.max_examples, replace=False))
    groups = None if pool.groups is None else pool.groups[train]
    clients = [train[p] for p in partition(pool.labels[train], groups, cfg.federation.clients, seed, cfg.partition)]
    clients, val = _hold_out(clients, cfg.val_fraction, seed, 0x7A1)
    local_test = None
    if cfg.eval.per_client or cfg.personalization.method != "none" or cfg.adapter.aggregation == "fedsa":
        clients, local_test = _hold_out(clients, cfg.eval.client_test_fraction, seed, 0x10CA)
    return DataRoles(pool=pool, train=clients, val=val, local_test=local_test, test=test, public=public)


def _load(cfg: "ExperimentConfig", name: str, max_examples: Optional[int], salt: int) -> LabeledTexts:
    d = cfg.data
    data = load_source(name, d.text_column, d.label_column, d.group_column)
    if cfg.task != "classify" and not isinstance(data, LabeledTexts):
        raise DataError(f"dataset {name!r} holds images; task {cfg.task!r} (language modelling) needs text. "
                        "Use task 'classify' for images, or a text dataset for mlm/clm")
    if d.dedupe:
        data = dedupe(data)
    if max_examples is not None and max_examples < len(data):
        keep = np.random.default_rng([cfg.seed, salt]).choice(len(data), max_examples, replace=False)
        data = data.subset(np.sort(keep))
    if cfg.task == "classify" and data.num_classes < 2:
        raise DataError(f"dataset {name!r} has {data.num_classes} label value(s); classification needs >= 2 "
                        "(an unlabelled corpus is for task mlm or clm)")
    if cfg.task != "classify":  # language modelling ignores labels: one shared label space
        data = LabeledTexts(name=data.name, texts=data.texts, labels=np.zeros(len(data), dtype=np.int64),
                            label_names=["text"], groups=data.groups, group_names=data.group_names)
    return data


def _without(data: LabeledTexts, taken: set[str]) -> LabeledTexts:
    keep = np.array([i for i, k in enumerate(data.keys()) if k not in taken], dtype=np.int64)
    if len(keep) == 0:
        raise DataError(f"every text of {data.name!r} also sits in another role; nothing is left for it")
    return data.subset(keep)


def _take_share(train: np.ndarray, fraction: float, cap: Optional[int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng([seed, 0x5A4E]).permutation(train)
    n = max(1, int(round(fraction * len(train))))
    n = min(n, cap) if cap is not None else n
    return np.sort(perm[n:]), np.sort(perm[:n])


def _hold_out(parts: list[np.ndarray], fraction: float, seed: int, salt: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per client, a seeded ``fraction`` of its examples held out (none when fraction is 0
    or the client has a single example)."""
    kept, held = [], []
    for c, idx in enumerate(parts):
        perm = np.random.default_rng([seed, c, salt]).permutation(idx)
        n = int(round(fraction * len(idx))) if len(idx) > 1 else 0
        held.append(np.sort(perm[:n]))
        kept.append(np.sort(perm[n:]))
    return kept, held
