"""Evaluation of the global model: loss, accuracy, macro-F1."""

from __future__ import annotations

import numpy as np
import torch

from fedfm.data.tokenized import TokenizedTexts
from fedfm.models.handle import ModelHandle


@torch.inference_mode()
def evaluate(handle: ModelHandle, data: TokenizedTexts, idx: np.ndarray, batch_size: int) -> dict[str, float]:
    """Mean cross-entropy, accuracy and macro-F1 of ``handle``'s current params on ``data[idx]``.
    Examples are batched in length order (same result, less padding)."""
    model = handle.model
    was_training = model.training
    model.eval()
    order = np.asarray(idx)[np.argsort(data.lengths[idx].numpy(), kind="stable")]
    total_loss, preds = 0.0, []
    for start in range(0, len(order), batch_size):
        batch = data.batch(order[start : start + batch_size])
        out = model(**batch)
        total_loss += float(out.loss) * len(batch["labels"])
        preds.append(out.logits.argmax(-1))
    model.train(was_training)
    y_pred = torch.cat(preds).numpy()
    y_true = data.labels[torch.from_numpy(order)].numpy()
    num_classes = int(handle.model.config.num_labels)
    return {
        "loss": total_loss / len(order),
        "accuracy": float((y_pred == y_true).mean()),
        "f1": macro_f1(y_true, y_pred, num_classes),
    }


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> float:
    """Unweighted mean over classes of F1 = 2TP / (2TP + FP + FN); a class absent from both
    truth and prediction is skipped (as in scikit-learn with zero_division handling of labels=present)."""
    scores = []
    for c in range(num_classes):
        tp = int(np.sum((y_pred == c) & (y_true == c)))
        fp = int(np.sum((y_pred == c) & (y_true != c)))
        fn = int(np.sum((y_pred != c) & (y_true == c)))
        if tp + fp + fn == 0:
            continue
        scores.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores)) if scores else 0.0
