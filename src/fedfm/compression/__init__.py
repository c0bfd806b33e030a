"""Compression of model updates as composable codecs (registered by name).

A client encodes its delta into a compact wire payload; the server decodes it back to a dense
delta before aggregation. ``build_compressor(["topk", "quantize"], ...)`` chains codecs;
``error_feedback=True`` wraps the chain so what it drops is sent in later rounds.
"""

from fedfm.compression import lowrank, quantize, topk  # noqa: F401  (registration)
from fedfm.compression.base import (
    COMPRESSORS,
    Chain,
    CompressionOptions,
    CompressionSettings,
    Compressor,
    ErrorFeedback,
    Identity,
    build_compressor,
    check_payload,
    payload_bytes,
)
from fedfm.compression.lowrank import LowRank
from fedfm.compression.quantize import ALLOWED_BITS, Quantize
from fedfm.compression.topk import TopK

__all__ = [
    "ALLOWED_BITS",
    "COMPRESSORS",
    "Chain",
    "CompressionOptions",
    "CompressionSettings",
    "Compressor",
    "ErrorFeedback",
    "Identity",
    "LowRank",
    "Quantize",
    "TopK",
    "build_compressor",
    "check_payload",
    "payload_bytes",
]
