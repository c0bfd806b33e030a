"""What travels: exact serialization and its byte count."""

from __future__ import annotations

import torch

from fedfm import wire


def test_round_trip_preserves_order_values_dtypes():
    t = {"z.b": torch.arange(3, dtype=torch.float32), "a.w": torch.randn(2, 2).double(), "m": torch.tensor([1, 2])}
    out = wire.decode(wire.encode(t))
    assert list(out) == list(t)
    assert all(torch.equal(out[k], t[k]) and out[k].dtype == t[k].dtype for k in t)


def test_bytes_are_payload_plus_small_header():
    t = {"w": torch.zeros(1000, dtype=torch.float32)}
    n = len(wire.encode(t))
    assert 4000 < n < 4000 + 256
