"""Cryptographic pseudo-random generators: mask expansion and a seedable byte source.

Bonawitz et al. 2017 (Sec. 3, "PRG") expand a short seed into a mask as long as the model
update; its security reduces to the PRG being indistinguishable from random. We use the
ChaCha20 keystream (RFC 7539) with the 32-byte seed as the key and a fixed nonce: each seed is
used for exactly one mask, so nonce reuse across seeds is harmless. torch's Mersenne Twister
is *not* cryptographic (its state is recoverable from 624 outputs) and must not make masks.
"""

from __future__ import annotations

import hashlib
import os
from typing import Callable

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

RandomBytes = Callable[[int], bytes]
"""A source of random bytes: ``rng(n)`` returns ``n`` bytes. ``os.urandom`` in deployment."""

SEED_BYTES = 32
_MASK_NONCE = b"\x00" * 4 + b"fedfm-mask\x00\x00"  # 4-byte block counter (0) + 12-byte nonce


def _keystream(key: bytes, nonce: bytes) -> "Callable[[bytes], bytes]":
    return Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor().update


def expand_mask(seed: bytes, length: int, bits: int) -> torch.Tensor:
    """Expand a seed into ``length`` independent uniform integers in [0, 2^bits).

    Each element takes 8 keystream bytes (little-endian uint64) and keeps the low ``bits``
    bits, which is exactly uniform because 2^bits divides 2^64.

    Args:
        seed: 32-byte secret seed.
        length: number of elements.
        bits: ring size exponent (<= 62 so the result fits int64).

    Returns:
        int64 tensor of shape (length,).
    """
    if len(seed) != SEED_BYTES:
        raise ValueError(f"mask seed must be {SEED_BYTES} bytes, got {len(seed)}")
    raw = _keystream(seed, _MASK_NONCE)(bytes(8 * length))
    words = np.frombuffer(raw, dtype="<u8") & np.uint64((1 << bits) - 1)
    return torch.from_numpy(words.astype(np.int64))


class SeededBytes:
    """A deterministic :data:`RandomBytes` for reproducible *simulation only*.

    Streams the ChaCha20 keystream keyed by SHA-256 of the seed, so keys, self-mask seeds and
    Shamir coefficients are reproducible from one integer seed. Anyone who knows the seed knows
    every secret: deployments must use ``os.urandom``.
    """

    def __init__(self, seed: int) -> None:
        key = hashlib.sha256(b"fedfm-secagg/simulation-rng/" + str(seed).encode()).digest()
        self._next = _keystream(key, bytes(16))

    def __call__(self, n: int) -> bytes:
        return self._next(bytes(n))


def system_bytes(n: int) -> bytes:
    """Operating-system randomness (the deployment default)."""
    return os.urandom(n)
