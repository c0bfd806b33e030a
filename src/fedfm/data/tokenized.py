"""Texts tokenized once, batched by index with per-batch padding."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional

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

    def batch(self, idx: np.ndarray, rng: Optional[np.random.Generator] = None) -> dict[str, torch.Tensor]:
        """Model inputs for examples ``idx`` (``rng`` is unused: classification batches are fixed)."""
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


@dataclass(frozen=True)
class LMTexts:
    """Language-modelling batches over tokenized texts: one example is one segment.

    ``clm``: labels are the input ids (padding ignored); the model shifts them.
    ``mlm``: BERT's recipe (Devlin et al. 2019): 15% of real tokens are predicted; of those
    80% become [MASK], 10% a random token, 10% stay. The masks come from the caller's
    generator, so training is seeded and evaluation (fixed generator) is deterministic.
    """

    tokens: TokenizedTexts
    objective: Literal["mlm", "clm"]
    mask_id: int
    vocab_size: int
    special_ids: tuple[int, ...]
    mlm_probability: float = 0.15

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def lengths(self) -> torch.Tensor:
        return self.tokens.lengths

    @property
    def labels(self) -> torch.Tensor:
        return self.tokens.labels

    def batch(self, idx: np.ndarray, rng: Optional[np.random.Generator] = None) -> dict[str, torch.Tensor]:
        b = self.tokens.batch(idx)
        ids, mask = b["input_ids"], b["attention_mask"]
        if self.objective == "clm":
            return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
        return {"attention_mask": mask, **self._mask_tokens(ids, mask, rng or np.random.default_rng(0))}

    def _mask_tokens(self, ids: torch.Tensor, mask: torch.Tensor, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        candidates = (mask == 1) & ~torch.isin(ids, torch.tensor(self.special_ids, dtype=ids.dtype))
        chosen = (torch.rand(ids.shape, generator=gen) < self.mlm_probability) & candidates
        if not chosen.any() and candidates.any():  # never a batch with nothing to predict
            chosen.view(-1)[int(candidates.view(-1).nonzero()[0])] = True
        labels = ids.masked_fill(~chosen, -100)
        roll = torch.rand(ids.shape, generator=gen)
        out = ids.clone()
        out[chosen & (roll < 0.8)] = self.mask_id
        swap = chosen & (roll >= 0.8) & (roll < 0.9)
        out[swap] = torch.randint(self.vocab_size, (int(swap.sum()),), generator=gen)
        return {"input_ids": out, "labels": labels}

    def predicted_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        """Tokens the loss averages over (causal LMs shift labels by one)."""
        labels = batch["labels"][:, 1:] if self.objective == "clm" else batch["labels"]
        return int((labels != -100).sum())


def tokenize_for(task: str, texts: list[str], labels: np.ndarray, tokenizer: Any, max_length: int) -> Any:
    """TokenizedTexts for classification, LMTexts for mlm/clm."""
    tokens = tokenize(texts, labels, tokenizer, max_length)
    if task == "classify":
        return tokens
    if task == "mlm" and tokenizer.mask_token_id is None:
        from fedfm.errors import ModelError

        raise ModelError("task 'mlm' needs a tokenizer with a mask token; this model's tokenizer has none (use clm)")
    return LMTexts(tokens=tokens, objective=task, mask_id=int(tokenizer.mask_token_id or 0),  # type: ignore[arg-type]
                   vocab_size=len(tokenizer), special_ids=tuple(int(i) for i in tokenizer.all_special_ids))
