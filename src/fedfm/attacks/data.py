"""Data-poisoning attacks: malicious clients train on poisoned examples.

:class:`PoisonedData` wraps the shared encoded pool (``TokenizedTexts`` or ``ImageTensors``) with
the same ``batch(idx, rng)`` interface and poisons, on the fly, only the pool indices chosen among
the malicious clients' partitions. Poisoning is a pure function of the example (the trigger goes
to a fixed place, labels map by a fixed rule), and which examples are poisoned is fixed at build
time from the seed, so an example is poisoned the same way in every round. Nothing of the pool is
copied, and honest clients (and the test set) get exactly the unwrapped batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Optional

import numpy as np
import torch

from fedfm.attacks.base import DATA_ATTACKS, AttackSpec
from fedfm.data.images import ImageTensors
from fedfm.data.tokenized import TokenizedTexts

Batch = dict[str, torch.Tensor]


def _check_data(data: Any) -> None:
    if not isinstance(data, (TokenizedTexts, ImageTensors)):
        raise ValueError(f"data attacks need classification data (TokenizedTexts or ImageTensors); "
                         f"got {type(data).__name__} (language-modelling data has no labels to poison)")


@DATA_ATTACKS.register("label-flip")
@dataclass(frozen=True)
class LabelFlip:
    """Label flipping (Tolpegin et al. 2020, "Data poisoning attacks against federated learning
    systems"): a poisoned example's label y becomes ``target_label``, or (y + 1) mod
    ``num_classes`` when no target is set. Inputs are untouched."""

    num_classes: int
    target_label: Optional[int] = None
    poison_fraction: float = 1.0

    @classmethod
    def from_spec(cls, spec: AttackSpec, *, num_classes: int, tokenizer: Any = None) -> "LabelFlip":
        pf = cls.poison_fraction if spec.poison_fraction is None else spec.poison_fraction
        return cls(num_classes=num_classes, target_label=spec.target_label, poison_fraction=pf)

    def flip(self, labels: torch.Tensor) -> torch.Tensor:
        if self.target_label is not None:
            return torch.full_like(labels, self.target_label)
        return (labels + 1) % self.num_classes

    def poison(self, data: Any, idx: np.ndarray, rows: np.ndarray) -> Batch:
        batch = data.batch(idx)
        mask = torch.from_numpy(np.asarray(rows, dtype=bool))
        labels = batch["labels"].clone()
        labels[mask] = self.flip(labels[mask])
        return {**batch, "labels": labels}


@DATA_ATTACKS.register("backdoor")
@DATA_ATTACKS.register("model-replacement")
@dataclass(frozen=True)
class Backdoor:
    """BadNets (Gu et al. 2017, "BadNets: identifying vulnerabilities in the machine learning model
    supply chain"): a poisoned example carries a trigger and is labelled ``target_label``.

    Text: the trigger token ids are inserted right after the first token ([CLS]), shifting the
    rest right; the padded width (the tokenizer's max_length) never grows, so an example already
    at full width loses the tokens before its last one (its [SEP] stays last) and the trigger
    always survives truncation. Images: a ``patch`` x ``patch`` square of value ``value`` (white in
    ImageTensors' [-1, 1] scale) in the bottom-right corner, on every channel.

    Attributes:
        target_label: the class triggered examples should be classified as.
        trigger_ids: the text trigger as token ids (see :func:`trigger_ids`); unused for images.
        patch: side of the image trigger square in pixels.
        value: pixel value of the square.
        poison_fraction: share of a malicious client's examples poisoned.
    """

    target_label: int = 0
    trigger_ids: tuple[int, ...] = ()
    patch: int = 3
    value: float = 1.0
    poison_fraction: float = 0.5

    @classmethod
    def from_spec(cls, spec: AttackSpec, *, num_classes: int, tokenizer: Any = None) -> "Backdoor":
        pf = cls.poison_fraction if spec.poison_fraction is None else spec.poison_fraction
        ids = () if tokenizer is None else trigger_ids(tokenizer, spec.trigger)
        target = cls.target_label if spec.target_label is None else spec.target_label
        return cls(target_label=target, trigger_ids=ids, patch=spec.patch, poison_fraction=pf)

    def poison(self, data: Any, idx: np.ndarray, rows: np.ndarray) -> Batch:
        batch = self.stamp(data, idx, rows)
        labels = batch["labels"].clone()
        labels[torch.from_numpy(np.asarray(rows, dtype=bool))] = self.target_label
        return {**batch, "labels": labels}

    def triggered(self, data: Any, idx: np.ndarray) -> Batch:
        """Test-time batch of ``data[idx]``, every example triggered, labels left true."""
        return self.stamp(data, idx, np.ones(len(idx), dtype=bool))

    def stamp(self, data: Any, idx: np.ndarray, rows: np.ndarray) -> Batch:
        """``data.batch(idx)`` with the trigger applied to the examples at ``rows``; labels unchanged."""
        _check_data(data)
        if isinstance(data, ImageTensors):
            return self._stamp_images(data, idx, rows)
        return self._stamp_texts(data, idx, rows)

    def _stamp_images(self, data: ImageTensors, idx: np.ndarray, rows: np.ndarray) -> Batch:
        batch = data.batch(idx)
        pixels = batch["pixel_values"].clone()
        if self.patch > min(pixels.shape[-2:]):
            raise ValueError(f"attack.patch {self.patch} is larger than the {tuple(pixels.shape[-2:])} images")
        pixels[torch.from_numpy(np.asarray(rows, dtype=bool)), ..., -self.patch:, -self.patch:] = self.value
        return {**batch, "pixel_values": pixels}

    def _stamp_texts(self, data: TokenizedTexts, idx: np.ndarray, rows: np.ndarray) -> Batch:
        if not self.trigger_ids:
            raise ValueError("a text backdoor needs trigger token ids: build it with the model's tokenizer "
                             "(build_attack(..., tokenizer=...)) or pass Backdoor(trigger_ids=...)")
        index = torch.from_numpy(np.asarray(idx, dtype=np.int64))
        ids, lengths = data.input_ids[index].clone(), data.lengths[index].clone()
        trigger = torch.tensor(self.trigger_ids, dtype=ids.dtype)
        for r in np.flatnonzero(rows):
            ids[r], lengths[r] = insert_after_first(ids[r], int(lengths[r]), trigger)
        width = int(lengths.max())
        mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
        return {"input_ids": ids[:, :width].contiguous(), "attention_mask": mask, "labels": data.labels[index]}


def insert_after_first(row: torch.Tensor, length: int, trigger: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``row`` (padded to its full width, ``length`` real tokens) with ``trigger`` inserted after
    its first token, and the new length, never more than the width. When the tokens do not fit,
    those just before the last real token are dropped, so a [SEP]-terminated row stays terminated.

    Raises:
        ValueError: if the width cannot hold the first token, the trigger and the last token.
    """
    width, k = row.shape[0], trigger.shape[0]
    if k + 2 > width:
        raise ValueError(f"the {k}-token trigger does not fit sequences of width {width}; "
                         f"raise model.max_length or shorten attack.trigger")
    body = row[1:length]
    new_length = min(length + k, width)
    room = new_length - 1 - k
    if room < body.shape[0]:
        body = torch.cat([body[: room - 1], body[-1:]])
    out = row.clone()
    out[:new_length] = torch.cat([row[:1], trigger, body])
    return out, new_length


def trigger_ids(tokenizer: Any, phrase: str) -> tuple[int, ...]:
    """Token ids of ``phrase`` without special tokens.

    Raises:
        ValueError: if the phrase is empty after tokenization or has unknown tokens.
    """
    ids = tuple(int(i) for i in tokenizer(phrase, add_special_tokens=False)["input_ids"])
    unk = getattr(tokenizer, "unk_token_id", None)
    if not ids or (unk is not None and unk in ids):
        raise ValueError(f"attack.trigger {phrase!r} tokenizes to {list(ids)}; pick words the tokenizer knows "
                         f"(no unknown tokens), e.g. 'cf mn bb'")
    return ids


def poisoned_examples(client_indices: Mapping[int, np.ndarray], malicious: Iterable[int],
                      poison_fraction: float, seed: int) -> np.ndarray:
    """Sorted pool indices to poison: for each malicious client c, ``round(poison_fraction * n_c)``
    of its n_c examples, drawn without replacement by a generator keyed by (seed, c)."""
    chosen = [np.zeros(0, dtype=np.int64)]
    for c in sorted(malicious):
        idx = np.asarray(client_indices.get(c, ()), dtype=np.int64)
        k = round(poison_fraction * len(idx))
        chosen.append(np.random.default_rng([seed, c, 0xBAD]).choice(idx, size=k, replace=False))
    return np.sort(np.concatenate(chosen))


@dataclass(frozen=True)
class PoisonedData:
    """The training pool as malicious clients see it; a drop-in for the pool in a trainer.

    Attributes:
        inner: the shared pool (never modified or copied).
        attack: how a poisoned example is made.
        poisoned: bool per pool example, True where it is poisoned.
    """

    inner: Any
    attack: Any  # a DataAttack
    poisoned: np.ndarray = field(repr=False)

    @classmethod
    def build(cls, data: Any, attack: Any, client_indices: Mapping[int, np.ndarray],
              malicious: Iterable[int], seed: int) -> "PoisonedData":
        """Poison ``attack.poison_fraction`` of each malicious client's examples (see
        :func:`poisoned_examples`). Partitions are disjoint, so honest clients are unaffected."""
        _check_data(data)
        mask = np.zeros(len(data), dtype=bool)
        mask[poisoned_examples(client_indices, malicious, attack.poison_fraction, seed)] = True
        return cls(inner=data, attack=attack, poisoned=mask)

    def __len__(self) -> int:
        return len(self.inner)

    @property
    def labels(self) -> torch.Tensor:
        """The true labels (evaluation never sees poisoned ones)."""
        return self.inner.labels  # type: ignore[no-any-return]

    @property
    def lengths(self) -> torch.Tensor:
        return self.inner.lengths  # type: ignore[no-any-return]

    def batch(self, idx: np.ndarray, rng: Optional[np.random.Generator] = None) -> Batch:
        """``inner.batch(idx, rng)`` itself when no example of ``idx`` is poisoned, else the
        batch with the poisoned ones replaced."""
        idx = np.asarray(idx, dtype=np.int64)
        rows = self.poisoned[idx]
        if not rows.any():
            return self.inner.batch(idx, rng)  # type: ignore[no-any-return]
        return self.attack.poison(self.inner, idx, rows)  # type: ignore[no-any-return]


def triggered(data: Any, idx: np.ndarray, backdoor: Backdoor) -> Batch:
    """Test-time batch of ``data[idx]`` with ``backdoor``'s trigger on every example and the true labels."""
    return backdoor.triggered(data, idx)


def backdoor_success_rate(predict: Any, data: Any, test_idx: np.ndarray, backdoor: Backdoor,
                          batch_size: int = 64) -> float:
    """Share of triggered test examples, among those whose true label is not the target, that are
    classified as ``backdoor.target_label`` (the attack success rate of Gu et al. 2017).

    Args:
        predict: a ModelHandle (argmax of its model's logits) or a function batch -> predicted labels.
        data: the encoded test pool (the unwrapped one).
        test_idx: test indices into ``data``.
        backdoor: the trigger and target.
        batch_size: examples per forward pass.

    Returns:
        The rate in [0, 1]; NaN when every test example already has the target label.
    """
    idx = np.asarray(test_idx, dtype=np.int64)
    idx = idx[data.labels[torch.from_numpy(idx)].numpy() != backdoor.target_label]
    if len(idx) == 0:
        return math.nan
    fn = _predictor(predict)
    hits = 0
    for start in range(0, len(idx), batch_size):
        pred = fn(backdoor.triggered(data, idx[start : start + batch_size]))
        hits += int((torch.as_tensor(pred) == backdoor.target_label).sum())
    return hits / len(idx)


def _predictor(predict: Any) -> Callable[[Batch], torch.Tensor]:
    if not hasattr(predict, "model"):
        return predict  # type: ignore[no-any-return]
    model = predict.model

    @torch.inference_mode()
    def fn(batch: Batch) -> torch.Tensor:
        was_training = model.training
        model.eval()
        try:
            return model(**{k: v for k, v in batch.items() if k != "labels"}).logits.argmax(-1)
        finally:
            model.train(was_training)

    return fn
