"""Evaluation of the global model: loss, accuracy and macro-F1 for classification;
loss and perplexity for language modelling."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from fedfm.data.tokenized import LMTexts
from fedfm.models.handle import ModelHandle


@torch.inference_mode()
def evaluate(handle: ModelHandle, data: Any, idx: np.ndarray, batch_size: int) -> dict[str, float]:
    """Metrics of ``handle``'s current params on ``data[idx]``. Examples are batched in length
    order (same result, less padding)."""
    model = handle.model
    was_training = model.training
    model.eval()
    order = np.asarray(idx)[np.argsort(data.lengths[idx].numpy(), kind="stable")]
    try:
        if isinstance(data, LMTexts):
            return _lm_metrics(model, data, order, batch_size)
        return _classification_metrics(model, data, order, batch_size)
    finally:
        model.train(was_training)


def _classification_metrics(model: Any, data: Any, order: np.ndarray, batch_size: int) -> dict[str, float]:
    total_loss, preds = 0.0, []
    for start in range(0, len(order), batch_size):
        batch = data.batch(order[start : start + batch_size])
        out = model(**batch)
        total_loss += float(out.loss) * len(batch["labels"])
        preds.append(out.logits.argmax(-1))
    y_pred = torch.cat(preds).numpy()
    y_true = data.labels[torch.from_numpy(order)].numpy()
    return {
        "loss": total_loss / len(order),
        "accuracy": float((y_pred == y_true).mean()),
        "f1": macro_f1(y_true, y_pred, int(model.config.num_labels)),
    }


def _lm_metrics(model: Any, data: LMTexts, order: np.ndarray, batch_size: int) -> dict[str, float]:
    """Token-weighted mean loss and its exponential, the perplexity (for MLM: over the masked
    tokens of a fixed, seeded masking, so every evaluation sees the same masks)."""
    rng = np.random.default_rng(0)
    total, tokens = 0.0, 0
    for start in range(0, len(order), batch_size):
        batch = data.batch(order[start : start + batch_size], rng)
        n = data.predicted_tokens(batch)
        if n:
            total += float(model(**batch).loss) * n
            tokens += n
    loss = total / max(tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> float:
    """Unweighted mean over classes of F1 = 2TP / (2TP + FP + FN); a class absent from both
    truth and prediction is skipped (scikit-learn's macro average over present labels)."""
    scores = []
    for c in range(num_classes):
        tp = int(np.sum((y_pred == c) & (y_true == c)))
        fp = int(np.sum((y_pred == c) & (y_true != c)))
        fn = int(np.sum((y_pred != c) & (y_true == c)))
        if tp + fp + fn == 0:
            continue
        scores.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores)) if scores else 0.0
