"""Update codecs against references: unbiasedness and bounds of the quantizer, a slow bit-packing
reference, top-k against a sort, exact low-rank reconstruction, mass conservation of error
feedback, and byte counts against the wire serialization.

Tolerances: float64 sums 1e-10 absolute; float32 grids 1e-5 of a step or of the range.
"""

from __future__ import annotations

import math

import pytest
import torch

from fedfm import wire
from fedfm.compression import (
    COMPRESSORS,
    Chain,
    ErrorFeedback,
    LowRank,
    Quantize,
    TopK,
    build_compressor,
    check_payload,
    payload_bytes,
)
from fedfm.compression.quantize import pack, unpack
from fedfm.errors import ConfigError


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads only add contention


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


def chunk_grid(x: torch.Tensor, payload: dict, name: str, chunk: int) -> tuple[torch.Tensor, ...]:
    """Per value: its chunk's step, min and max (the reference the bounds are checked against)."""
    step = payload[f"{name}.scale"].double().repeat_interleave(chunk)[: x.numel()]
    rows = torch.nn.functional.pad(x.double().reshape(-1), (0, (-x.numel()) % chunk), value=float("nan"))
    lo = rows.view(-1, chunk).nan_to_num(float("inf")).amin(1).repeat_interleave(chunk)[: x.numel()]
    hi = rows.view(-1, chunk).nan_to_num(float("-inf")).amax(1).repeat_interleave(chunk)[: x.numel()]
    return step, lo, hi


def mixed_scale_vector(n: int = 3000) -> torch.Tensor:
    """Values whose range differs per chunk (including an outlier), with a partial last chunk."""
    x = torch.randn(n, generator=gen(1))
    x[:1000] *= 0.01
    x[2500] = 40.0
    return x


# --- quantize -------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_quantizer_is_unbiased(bits):
    x, q, trials = {"w": mixed_scale_vector()}, Quantize(bits=bits), 300
    payloads = [q.encode(x, None, gen(s))[0] for s in range(trials)]
    draws = torch.stack([q.decode(p, x)["w"].double() for p in payloads])
    step, _, _ = chunk_grid(x["w"], payloads[0], "w", q.chunk)
    # each draw has variance <= step^2 / 4, so the mean's error is within 5 sigma = 2.5 step / sqrt(T)
    err = (draws.mean(0) - x["w"].double()).abs() / step
    assert float(err.max()) < 2.5 / math.sqrt(trials)
    # a deterministic rounding (biased) would miss by up to step / 2: the draws are really random
    assert float(((draws[0] - x["w"].double()).abs() / step).max()) > 0.25


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_quantized_values_within_one_step_and_range(bits, dtype):
    x = {"w": mixed_scale_vector().to(dtype)}
    q = Quantize(bits=bits)
    payload, _ = q.encode(x, None, gen(3))
    out = q.decode(payload, x)["w"].double()
    step, lo, hi = chunk_grid(x["w"], payload, "w", q.chunk)
    tol = 1e-5 * (hi - lo)
    assert bool(((out - x["w"].double()).abs() <= step + tol).all())
    assert bool(((out >= lo - tol) & (out <= hi + tol)).all())


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_packing_round_trips_and_matches_slow_reference(bits):
    codes = torch.randint(0, 2**bits, (1001,), generator=gen(bits), dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(1001 * bits / 8)
    assert torch.equal(unpack(packed, bits, 1001), codes)
    per, ref = 8 // bits, []
    for start in range(0, 1001, per):
        ref.append(sum(int(c) << (bits * j) for j, c in enumerate(codes[start : start + per])))
    assert packed.tolist() == ref


def test_constant_tensor_is_exact():
    x = {"w": torch.full((500,), 0.375)}
    q = Quantize(bits=2)
    assert torch.equal(q.decode(q.encode(x, None, gen())[0], x)["w"], x["w"])


# --- top-k ----------------------------------------------------------------------------------


def test_topk_sends_the_floor_of_fraction_times_size_largest_coordinates():
    x = torch.randn(40, 25, generator=gen(4), dtype=torch.float64)
    t = TopK(fraction=0.013)
    payload, state = t.encode({"w": x}, None, gen())
    assert state is None
    idx, val = payload["w.idx"], payload["w.val"]
    assert idx.dtype == torch.int32 and idx.numel() == math.floor(0.013 * 1000) == 13
    assert torch.equal(val, x.reshape(-1)[idx.long()])
    unsent = torch.ones(1000, dtype=torch.bool)
    unsent[idx.long()] = False
    assert float(val.abs().min()) >= float(x.reshape(-1)[unsent].abs().max())
    out = t.decode(payload, {"w": x})["w"]
    assert torch.equal(out.reshape(-1)[idx.long()], val) and bool((out.reshape(-1)[unsent] == 0).all())


def test_topk_counts():
    assert TopK(0.29).k(100) == 29  # not 28, though 0.29 * 100 == 28.999999999999996 in floats
    assert TopK(0.01).k(37) == 1  # at least one
    assert TopK(1.0).k(37) == 37


def _mass_conservation(codec, rounds: int = 8) -> tuple[dict, dict, dict]:
    like = {"w": torch.zeros(30, 20, dtype=torch.float64), "b": torch.zeros(300, dtype=torch.float64)}
    total_in = {k: torch.zeros_like(v) for k, v in like.items()}
    total_sent = {k: torch.zeros_like(v) for k, v in like.items()}
    state = None
    for r in range(rounds):
        delta = {k: torch.randn(v.shape, generator=gen(100 + r), dtype=torch.float64) for k, v in like.items()}
        payload, state = codec.encode(delta, state, gen(r))
        sent = codec.decode(payload, like)
        for k in like:
            total_in[k] += delta[k]
            total_sent[k] += sent[k]
    return total_in, total_sent, state


@pytest.mark.parametrize("names", [["topk"], ["lowrank"], ["topk", "quantize"], ["lowrank", "quantize"]])
def test_error_feedback_conserves_mass(names):
    codec = build_compressor(names, bits=4, fraction=0.1, rank=2, error_feedback=True)
    total_in, total_sent, residual = _mass_conservation(codec)
    assert residual is not None and set(residual) == {"w", "b"}
    assert float(residual["w"].abs().max()) > 0.1  # something was held back
    for k in total_in:
        assert max_abs_diff(total_sent[k] + residual[k], total_in[k]) < 1e-10


@pytest.mark.parametrize("names", [["topk"], ["lowrank"]])
def test_without_error_feedback_nothing_is_kept_and_mass_is_lost(names):
    codec = build_compressor(names, fraction=0.1, rank=2, error_feedback=False)
    total_in, total_sent, state = _mass_conservation(codec)
    assert state is None
    assert float((total_sent["w"] - total_in["w"]).abs().max()) > 0.1


def test_error_feedback_residual_is_at_least_float32():
    codec = ErrorFeedback(TopK(0.1))
    _, residual = codec.encode({"w": torch.randn(100, generator=gen()).bfloat16()}, None, gen())
    assert residual["w"].dtype == torch.float32


# --- low rank -------------------------------------------------------------------------------


@pytest.mark.parametrize("true_rank,rank", [(3, 3), (2, 4)])
def test_lowrank_is_exact_for_low_rank_matrices(true_rank, rank):
    m = torch.randn(60, true_rank, generator=gen(5), dtype=torch.float64) @ torch.randn(
        true_rank, 40, generator=gen(6), dtype=torch.float64
    )
    cube = (torch.randn(8, true_rank, generator=gen(7)) @ torch.randn(true_rank, 30, generator=gen(8))).view(8, 5, 6)
    like = {"m": m, "cube": cube}
    codec = LowRank(rank)
    payload, _ = codec.encode(like, None, gen(9))
    assert payload["m.P"].shape == (60, rank) and payload["cube.Q"].shape == (30, rank)
    out = codec.decode(payload, like)
    assert max_abs_diff(out["m"], m) < 1e-10
    assert max_abs_diff(out["cube"], cube) < 1e-4


def test_lowrank_is_lossy_above_rank_and_leaves_small_tensors_dense():
    like = {"full": torch.randn(50, 40, generator=gen()), "bias": torch.randn(40), "small": torch.randn(3, 3)}
    payload, _ = LowRank(2).encode(like, None, gen())
    assert list(payload) == ["full.P", "full.Q", "bias", "small"]
    out = LowRank(2).decode(payload, like)
    assert float((out["full"] - like["full"]).abs().max()) > 0.1
    assert torch.equal(out["bias"], like["bias"]) and torch.equal(out["small"], like["small"])


# --- bytes, names, chains -------------------------------------------------------------------


@pytest.mark.parametrize("bits,ratio", [(8, 3.9), (4, 7.8), (2, 15.5)])
def test_byte_counts_are_the_wire_length_and_quantizing_shrinks(bits, ratio):
    x = {"w": torch.randn(2**20, generator=gen())}
    payload, _ = Quantize(bits=bits).encode(x, None, gen())
    assert payload_bytes(payload) == len(wire.encode(payload))
    assert payload_bytes(x) / payload_bytes(payload) > ratio
    assert payload_bytes(x) / payload_bytes(payload) < 32 / bits


def mixed_like() -> dict[str, torch.Tensor]:
    return {
        "enc.w": torch.randn(64, 48, generator=gen(10)),
        "enc.b": torch.randn(48, generator=gen(11), dtype=torch.float64),
        "head.w": torch.randn(32, 40, generator=gen(12)).bfloat16(),
        "conv": torch.randn(16, 4, 3, 3, generator=gen(13)),
        "scale": torch.tensor(0.5),
        "steps": torch.arange(6),
    }


CODECS = [["none"], ["quantize"], ["topk"], ["lowrank"], ["topk", "quantize"], ["lowrank", "quantize"]]


@pytest.mark.parametrize("names", CODECS)
@pytest.mark.parametrize("error_feedback", [False, True])
def test_decode_restores_names_shapes_dtypes(names, error_feedback):
    like = mixed_like()
    codec = build_compressor(names, bits=4, fraction=0.2, rank=2, error_feedback=error_feedback)
    payload, _ = codec.encode(like, None, gen())
    assert check_payload(codec, payload, like) is None
    out = codec.decode(payload, like)
    assert list(out) == list(like)
    assert all(out[k].shape == like[k].shape and out[k].dtype == like[k].dtype for k in like)
    assert torch.equal(out["steps"], like["steps"])


def test_check_payload_names_what_is_wrong():
    like = mixed_like()
    codec = build_compressor(["topk", "quantize"], fraction=0.2)
    payload, _ = codec.encode(like, None, gen())
    assert "enc.w.val.q" in payload and "enc.w.idx" in payload
    assert "missing ['enc.w.idx']" in check_payload(codec, {k: v for k, v in payload.items() if k != "enc.w.idx"}, like)
    bad = dict(payload, **{"enc.w.idx": payload["enc.w.idx"][:-1]})
    assert "enc.w.idx" in check_payload(codec, bad, like)


def test_topk_then_quantize_is_within_one_step_of_topk():
    x = {"w": torch.randn(100, 100, generator=gen(14))}
    codec = build_compressor(["topk", "quantize"], bits=4, fraction=0.05)
    payload, _ = codec.encode(x, None, gen())
    kept = TopK(0.05).decode(TopK(0.05).encode(x, None, gen())[0], x)["w"]
    out = codec.decode(payload, x)["w"]
    step = payload["w.val.scale"].max()
    assert torch.equal(out == 0, kept == 0)
    assert float((out - kept).abs().max()) <= float(step) * (1 + 1e-5)
    assert payload_bytes(payload) < payload_bytes(TopK(0.05).encode(x, None, gen())[0])


def test_chain_keeps_stage_state_apart():
    codec = Chain((ErrorFeedback(TopK(0.1)), Quantize(bits=8)))
    x = {"w": torch.randn(50, 60, generator=gen())}
    _, state = codec.encode(x, None, gen())
    assert list(state) == ["0:w"]
    _, state2 = codec.encode(x, state, gen(1))
    assert not torch.equal(state2["0:w"], state["0:w"])


def test_same_seed_same_payload():
    like, codec = mixed_like(), build_compressor(["lowrank", "quantize"], bits=2, rank=2)
    a, b = codec.encode(like, None, gen(7))[0], codec.encode(like, None, gen(7))[0]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_colliding_payload_names_are_refused():
    with pytest.raises(ValueError, match="produced twice"):
        Quantize(bits=8).encode({"a": torch.randn(300), "a.q": torch.randn(3)}, None, gen())


# --- configuration --------------------------------------------------------------------------


def test_registry_names():
    assert COMPRESSORS.names() == ["lowrank", "none", "quantize", "topk"]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"names": "quantize", "bits": 3}, r"one of \[1, 2, 4, 8\], got 3"),
        ({"names": "topk", "fraction": 0.0}, r"in \(0, 1\], got 0.0"),
        ({"names": "topk", "fraction": 1.5}, r"in \(0, 1\], got 1.5"),
        ({"names": "lowrank", "rank": 0}, r"integer >= 1, got 0"),
        ({"names": ["quantize", "topk"]}, "quantize must be the last"),
    ],
)
def test_bad_settings_raise_with_allowed_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_compressor(**kwargs)


def test_unknown_name_lists_allowed():
    with pytest.raises(ConfigError, match="allowed: lowrank, none, quantize, topk"):
        build_compressor(["gzip"])
