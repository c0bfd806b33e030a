"""Images as model-ready tensors, batched by index."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch


@dataclass(frozen=True)
class ImageTensors:
    """Greyscale images scaled to [-1, 1] as (N, 1, H, W) float32, with labels."""

    pixels: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def lengths(self) -> torch.Tensor:
        """Every image has the same size (the evaluator sorts by length; nothing to gain here)."""
        return torch.ones(len(self), dtype=torch.long)

    def batch(self, idx: np.ndarray, rng: Optional[np.random.Generator] = None) -> dict[str, torch.Tensor]:
        index = torch.from_numpy(np.asarray(idx, dtype=np.int64))
        return {"pixel_values": self.pixels[index], "labels": self.labels[index]}


def to_tensors(images: Any) -> ImageTensors:
    """uint8 (N, H, W) -> float (N, 1, H, W) in [-1, 1]."""
    pixels = torch.from_numpy(np.ascontiguousarray(images.images)).float().div_(127.5).sub_(1.0).unsqueeze(1)
    return ImageTensors(pixels=pixels, labels=torch.as_tensor(images.labels, dtype=torch.long))


def is_image_pool(pool: Any) -> bool:
    return hasattr(pool, "images")
