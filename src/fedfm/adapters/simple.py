"""Adapters that need no library: full fine-tuning and head-only training."""

from __future__ import annotations

from typing import Any

from fedfm.adapters.base import ADAPTERS, freeze_all, head_names


class Full:
    """Every parameter trains and travels."""

    def apply(self, model: Any, cfg: Any, preset: Any) -> Any:
        for p in model.parameters():
            p.requires_grad_(True)
        return model


class Head:
    """Only the task head (classifier) trains and travels; the encoder stays frozen."""

    def apply(self, model: Any, cfg: Any, preset: Any) -> Any:
        freeze_all(model)
        for name in head_names(model):
            for p in getattr(model, name).parameters():
                p.requires_grad_(True)
        return model


ADAPTERS.register("full")(Full())
ADAPTERS.register("head")(Head())
