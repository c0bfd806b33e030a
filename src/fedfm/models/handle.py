"""The shared model object of a simulation and its communicated parameters."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fedfm.types import NamedTensors


@dataclass
class ModelHandle:
    """One model shared by every simulated client; clients differ only in the
    trainable state loaded into it, so memory never grows with clients x model size.

    Attributes:
        model: the (possibly peft-wrapped) transformers model.
        tokenizer: its tokenizer.
        trainable: name -> parameter of everything that trains (and travels), in model order.
    """

    model: Any
    tokenizer: Any
    trainable: dict[str, torch.nn.Parameter]

    @classmethod
    def wrap(cls, model: Any, tokenizer: Any) -> "ModelHandle":
        # One mode for the whole tree. from_pretrained leaves every module in eval mode, and peft
        # then adds its layers in train mode with a top-level flag of True, so a trainer that
        # checks the top-level flag would train without the base model's dropout until something
        # called model.train(): a resumed run then differed from an uninterrupted one, whose
        # initial evaluation had restored train mode everywhere.
        model.train()
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        return cls(model=model, tokenizer=tokenizer, trainable=trainable)

    def get_params(self) -> dict[str, torch.Tensor]:
        """A detached copy of the trainable parameters."""
        return {n: p.detach().clone() for n, p in self.trainable.items()}

    def set_params(self, params: NamedTensors, partial: bool = False) -> None:
        """Load communicated parameters into the shared model (names and shapes must match; with
        ``partial``, only the names given, e.g. the shared part of a personalized model)."""
        with torch.no_grad():
            if partial:
                for n, v in params.items():
                    self.trainable[n].copy_(v)
                return
            for n, p in self.trainable.items():
                p.copy_(params[n])

    def frozen_names(self) -> list[str]:
        return [n for n, p in self.model.named_parameters() if not p.requires_grad]
