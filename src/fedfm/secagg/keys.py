"""Pairwise key agreement: X25519 Diffie-Hellman, then HKDF-SHA256 to a 32-byte mask seed.

Bonawitz et al. 2017 (Sec. 3, "Key Agreement") let every pair of clients derive a shared seed
s_ij = KA.agree(sk_i, pk_j) = KA.agree(sk_j, pk_i) without talking to each other, which is what
makes the pairwise masks cancel; HKDF (RFC 5869) turns the raw Diffie-Hellman output into a
uniform seed. Key pairs must be fresh for every aggregation: reusing one would reuse the
pairwise masks and reveal the difference of a client's inputs across rounds.
"""

from __future__ import annotations

from typing import Mapping

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedfm.secagg.prg import SEED_BYTES, RandomBytes

KEY_BYTES = 32
_HKDF_INFO = b"fedfm-secagg/pairwise-mask-seed/v1"


def new_private_key(rng: RandomBytes) -> bytes:
    """32 raw bytes of a fresh X25519 private key (any 32 bytes are a valid key)."""
    return rng(KEY_BYTES)


def public_key(private_key: bytes) -> bytes:
    """The 32-byte raw X25519 public key of a raw private key."""
    return X25519PrivateKey.from_private_bytes(private_key).public_key().public_bytes_raw()


def agree(private_key: bytes, peer_public_key: bytes) -> bytes:
    """The 32-byte pairwise mask seed s_ij, the same from either side of the pair."""
    return agree_all(private_key, {0: peer_public_key})[0]


def agree_all(private_key: bytes, peer_public_keys: Mapping[int, bytes]) -> dict[int, bytes]:
    """:func:`agree` with each peer, parsing the private key once (the costly step)."""
    sk = X25519PrivateKey.from_private_bytes(private_key)
    return {j: _derive(sk.exchange(X25519PublicKey.from_public_bytes(pk))) for j, pk in peer_public_keys.items()}


def _derive(shared: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=SEED_BYTES, salt=None, info=_HKDF_INFO).derive(shared)
