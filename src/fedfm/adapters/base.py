"""Adapter extension point: which parameters train, and therefore which travel.

An adapter prepares the shared base model once (freezing, wrapping); afterwards the
parameters with ``requires_grad`` are exactly the communicated ``NamedTensors``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from fedfm.errors import ModelError
from fedfm.registry import Registry

if TYPE_CHECKING:
    from fedfm.config import AdapterConfig
    from fedfm.models.presets import ModelPreset

HEAD_NAMES = ("classifier", "score")
"""Attribute names of the task head in transformers' *ForSequenceClassification models."""


class Adapter(Protocol):
    def apply(self, model: Any, cfg: "AdapterConfig", preset: "ModelPreset") -> Any:
        """Freeze/wrap ``model`` so that its trainable parameters are what clients train and send."""
        ...


ADAPTERS: Registry[Adapter] = Registry("adapter method")


def head_names(model: Any) -> list[str]:
    """Top-level module names of the task head.

    Raises:
        ModelError: the model has no recognizable task head.
    """
    found = [n for n in HEAD_NAMES if hasattr(model, n)]
    if not found:
        raise ModelError(
            f"{type(model).__name__} has no task head named {' or '.join(HEAD_NAMES)}; "
            "adapter.method='head' and LoRA's train_head need one"
        )
    return found


def has_head(model: Any) -> bool:
    """Whether the model has a sequence-classification head (LM heads are not 'heads' here)."""
    return any(hasattr(model, n) for n in HEAD_NAMES)


def freeze_all(model: Any) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
