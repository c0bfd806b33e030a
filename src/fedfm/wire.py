"""Serialization of what travels. Bytes are counted from these encodings, never estimated.

safetensors is the format: no pickle (safe across institutions), a small JSON header,
and the raw tensor bytes, so a payload's size is its parameters' bytes plus the header.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from fedfm.types import NamedTensors


def encode(tensors: "NamedTensors") -> bytes:
    """Serialize name -> tensor to bytes (contiguous CPU copies; order kept in a header field)."""
    from safetensors.torch import save

    order = ",".join(tensors)
    return save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata={"order": order})


def decode(blob: bytes) -> "dict[str, torch.Tensor]":
    """Inverse of :func:`encode`, preserving the sender's order."""
    from safetensors.torch import load

    tensors = load(blob)
    order = _order(blob)
    return {k: tensors[k] for k in order} if order else tensors


def _order(blob: bytes) -> list[str]:
    import json
    import struct

    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n])
    order = header.get("__metadata__", {}).get("order", "")
    return order.split(",") if order else []
