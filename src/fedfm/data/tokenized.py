"""Texts tokenized once, batched by index with per-batch padding."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass(frozen=True)
class TokenizedTexts:
    """Token ids right-padded to the longest example, with true lengths and labels.

    Batches are cut to their own longest example, so short texts cost short compute.
    """

    input_ids: torch.Tensor  # (N, L) int64
    lengths: torch.Tensor  # (N,) int64
    labels: torch.Tensor  # (N,) int64
    pad_id: int

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def batch(self, idx: np.ndarray) -> dict[str, torch.Tensor]:
        index = torch.from_numpy(np.asarray(idx, dtype=np.int64))
        lengths = self.lengths[index]
        width = int(lengths.max())
        ids = self.input_ids[index, :width]
        mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
        return {"input_ids": ids, "attention_mask": mask, "labels": self.labels[index]}


def tokenize(texts: list[str], labels: np.ndarray, tokenizer: Any, max_length: int) -> TokenizedTexts:
    enc = tokenizer(texts, truncation=True, max_length=max_length, padding="longest", return_tensors="pt",
                    return_attention_mask=True)
    return TokenizedTexts(
        input_ids=enc["input_ids"].long(),
        lengths=enc["attention_mask"].sum(1).long(),
        labels=torch.as_tensor(labels, dtype=torch.long),
        pad_id=int(tokenizer.pad_token_id),
    )
