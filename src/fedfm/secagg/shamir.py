"""Shamir t-out-of-m secret sharing (Shamir 1979) over the prime field GF(2^521 - 1).

A secret s becomes the constant term of a random polynomial f of degree t-1; holder h gets
(x_h, f(x_h)). Any t shares determine f and hence s = f(0) by Lagrange interpolation; any t-1
shares are consistent with every possible secret, so they reveal nothing (information-
theoretically). Bonawitz et al. 2017 (Sec. 3) share each client's self-mask seed and mask key
this way so the server can recover exactly what it needs when clients drop out.

The field is the Mersenne prime 2^521 - 1, large enough that any 32-byte secret (a seed or an
X25519 private key) is one field element; Python integers do the arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from fedfm.secagg.prg import RandomBytes

PRIME = (1 << 521) - 1
_ELEMENT_BYTES = 66  # 528 bits, shifted down to 521


@dataclass(frozen=True)
class Share:
    """One point (x, f(x)) of a sharing polynomial; x != 0."""

    x: int
    y: int


def _random_element(rng: RandomBytes) -> int:
    while True:  # rejection sampling: uniform on [0, PRIME); rejects with probability 2^-521
        v = int.from_bytes(rng(_ELEMENT_BYTES), "big") >> 7
        if v < PRIME:
            return v


def _evaluate(coeffs: Sequence[int], x: int) -> int:
    acc = 0
    for c in reversed(coeffs):  # Horner
        acc = (acc * x + c) % PRIME
    return acc


def split(secret: int, xs: Sequence[int], threshold: int, rng: RandomBytes) -> tuple[Share, ...]:
    """Share ``secret`` at the points ``xs`` so that any ``threshold`` shares reconstruct it.

    Args:
        secret: field element in [0, PRIME).
        xs: distinct non-zero evaluation points, one per holder.
        threshold: t, the number of shares needed (1 <= t <= len(xs)).
        rng: randomness for the polynomial's coefficients.

    Raises:
        ValueError: on an out-of-range secret or threshold, or bad points.
    """
    if not 0 <= secret < PRIME:
        raise ValueError("secret must be a field element in [0, 2^521 - 1)")
    if not 1 <= threshold <= len(xs):
        raise ValueError(f"threshold={threshold} not allowed: must be in [1, {len(xs)}] (the number of holders)")
    _check_points(xs)
    coeffs = [secret] + [_random_element(rng) for _ in range(threshold - 1)]
    return tuple(Share(x, _evaluate(coeffs, x)) for x in xs)


def reconstruct(shares: Sequence[Share]) -> int:
    """Lagrange-interpolate f(0) from the given shares.

    With at least t shares of one sharing this is the secret; with fewer it is an unrelated
    field element (the caller must enforce the threshold).

    Raises:
        ValueError: if no shares are given or two shares have the same x.
    """
    if not shares:
        raise ValueError("cannot reconstruct from zero shares")
    xs = [s.x for s in shares]
    _check_points(xs)
    secret = 0
    for j, sj in enumerate(shares):
        num, den = 1, 1
        for m, xm in enumerate(xs):
            if m != j:
                num = num * xm % PRIME
                den = den * (xm - sj.x) % PRIME
        secret = (secret + sj.y * num * pow(den, -1, PRIME)) % PRIME
    return secret


def _check_points(xs: Sequence[int]) -> None:
    if len(set(x % PRIME for x in xs)) != len(xs) or any(x % PRIME == 0 for x in xs):
        raise ValueError(f"share points must be distinct and non-zero mod the prime, got {sorted(xs)}")
