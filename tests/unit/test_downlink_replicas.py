"""Downlink compression: per-client replicas corrected by compressed messages."""

from __future__ import annotations

import pytest
import torch

from fedfm import wire
from fedfm.compression import Quantize, TopK
from fedfm.compression.downlink import INITIAL, Downlink


def _params(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a.lora_A": torch.randn(8, 300, generator=g), "a.lora_B": torch.randn(300, 8, generator=g) * 1e-3,
            "head.bias": torch.randn(2, generator=g)}


def test_first_download_corrects_the_initial_state_and_bytes_are_the_payload():
    x0 = _params(0)
    x = {k: v + 0.01 * torch.randn_like(v) for k, v in x0.items()}
    d = Downlink(Quantize(bits=4))
    with pytest.raises(RuntimeError, match="initial state"):
        d.send(3, x, torch.Generator().manual_seed(0))
    d.start(x0)
    payload, held = d.send(3, x, torch.Generator().manual_seed(0))
    assert d.nbytes(x) == len(wire.encode(payload)) == wire.encoded_size(payload)
    assert d.nbytes(x) < wire.encoded_size(x) / 6  # 4 bits against 32, plus grids and the header
    assert d.replicas[3] is held and set(d.replicas) == {INITIAL, 3}
    # the replica is x0 plus the decoded message: within one grid step of x per value
    q = Quantize(bits=4)
    for k, v in x.items():
        diff = v - x0[k]
        if diff.numel() < q.min_numel:  # small tensors travel exactly
            torch.testing.assert_close(held[k], v, rtol=0, atol=1e-7)
            continue
        step = _steps(diff, q)
        assert ((held[k] - v).abs().reshape(-1) <= step * (1 + 1e-5) + 1e-7).all(), k


def test_what_a_message_leaves_out_is_sent_next_time():
    """Error feedback: with the global state fixed, each download leaves at most one grid step of
    error, and a chunk's grid spans at most twice the largest error, so a 4-bit download shrinks
    the largest error by at least 15 / 2."""
    x0, x = _params(0), _params(1)
    d = Downlink(Quantize(bits=4))
    d.start(x0)
    errors = [max(float((x[k] - x0[k]).abs().max()) for k in x)]
    for t in range(3):
        _, held = d.send(0, x, torch.Generator().manual_seed(t))
        errors.append(max(float((x[k] - held[k]).abs().max()) for k in x))
    assert all(b <= a * 2 / 15 * (1 + 1e-4) for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < errors[0] / 7.5**3


def test_topk_downlink_sends_the_largest_corrections_and_keeps_the_rest_for_later():
    x0, x = _params(0), _params(1)
    d = Downlink(TopK(fraction=0.1))
    d.start(x0)
    _, held = d.send(5, x, torch.Generator().manual_seed(0))
    for k in x:
        diff = (x[k] - x0[k]).reshape(-1)
        k_ = TopK(fraction=0.1).k(diff.numel())
        top = diff.abs().topk(k_).indices
        expect = x0[k].reshape(-1).clone()
        expect[top] += diff[top]
        torch.testing.assert_close(held[k].reshape(-1), expect, rtol=0, atol=0)
    # a client not yet sampled still holds the initial state; client 5 continues from its replica
    _, other = d.send(6, x, torch.Generator().manual_seed(0))
    torch.testing.assert_close(other, held, rtol=0, atol=0)
    _, again = d.send(5, x, torch.Generator().manual_seed(0))
    assert sum(int((again[k] != x[k]).sum()) for k in x) < sum(int((held[k] != x[k]).sum()) for k in x)


def test_quantized_download_is_unbiased():
    """E[replica] = global. Each value's download is one of two grid levels a step apart, so by
    Hoeffding the mean of n independent downloads is within 6 step / (2 sqrt(n)) of its
    expectation except with probability 2 exp(-18) per value."""
    x0, x = _params(0), _params(1)
    n, outs = 400, []
    for s in range(n):
        d = Downlink(Quantize(bits=2))
        d.start(x0)
        outs.append(d.send(0, x, torch.Generator().manual_seed(s))[1]["a.lora_A"])
    mean = torch.stack(outs).double().mean(0)
    step = _steps(x["a.lora_A"] - x0["a.lora_A"], Quantize(bits=2)).view_as(mean).double()
    assert ((mean - x["a.lora_A"].double()).abs() <= 6 * step / (2 * n**0.5) + 1e-6).all()
    assert (torch.stack(outs) != outs[0]).any()  # the downloads are random, not a fixed rounding


def _steps(diff: torch.Tensor, q: Quantize) -> torch.Tensor:
    """Each value's grid step: its chunk's range / (2**bits - 1)."""
    flat = diff.reshape(-1)
    rows = torch.nn.functional.pad(flat, (0, -flat.numel() % q.chunk), value=float(flat[-1])).view(-1, q.chunk)
    return ((rows.amax(1) - rows.amin(1)) / (2**q.bits - 1)).repeat_interleave(q.chunk)[: flat.numel()]


def test_replica_names_must_match():
    d = Downlink(Quantize(bits=8))
    d.start({"w": torch.zeros(300)})
    with pytest.raises(RuntimeError, match="names differ"):
        d.send(0, {"v": torch.zeros(300)}, torch.Generator())
