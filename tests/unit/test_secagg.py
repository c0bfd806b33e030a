"""Secure aggregation (SecAgg / SecAgg+) against references: the plain modular sum of the
quantized inputs (exact), the float sum (within n quantization steps), Lagrange/Shamir
thresholds, and the uniform distribution of a masked update (chi-square)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from fedfm.secagg import (
    FixedPoint,
    SecAggClient,
    SecAggConfig,
    SecAggError,
    SecAggServer,
    SeededBytes,
    Session,
    UnmaskRequest,
    UnmaskResponse,
    flatten,
    secure_sum,
    threshold,
    unflatten,
)
from fedfm.secagg import keys, shamir
from fedfm.secagg.graph import harary_neighbours
from fedfm.secagg.prg import expand_mask
from fedfm.secagg.quantize import reduce

N, DIM = 20, 1000


def _vectors(n: int, dim: int, seed: int = 0, scale: float = 1.0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(dim, generator=g, dtype=torch.float64) * 2 - 1) * scale for _ in range(n)]


def _rounding(i: int) -> torch.Generator:
    return torch.Generator().manual_seed(1000 + i)


def _setup(n: int, config: SecAggConfig, seed: int = 0):
    session, rng = Session.create(n, config, seed), SeededBytes(seed)
    clients = [SecAggClient.setup(i, session, rng) for i in range(n)]
    server = SecAggServer(session, {c.client_id: c.public_key for c in clients})
    inboxes = server.route_shares({c.client_id: c.share_secrets(rng) for c in clients})
    return session, clients, server, inboxes


def _mask_all(clients, server, vectors, dropped=(), weights=None):
    return {
        c.client_id: c.mask(vectors[c.client_id], server.keys_for(c.client_id), generator=_rounding(c.client_id),
                            weight=1.0 if weights is None else weights[c.client_id])
        for c in clients if c.client_id not in dropped
    }


def _run(vectors, config, dropped=(), silent=(), seed=0):
    """The step-by-step protocol; ``silent`` survivors send input but never answer round 3."""
    session, clients, server, inboxes = _setup(len(vectors), config, seed)
    masked = _mask_all(clients, server, vectors, dropped)
    request = server.request_unmasking(masked)
    responses = {i: clients[i].respond(request, inboxes[i]) for i in request.survivors if i not in silent}
    return session, server.unmask(masked, responses)


def _plain_modular_sum(session, vectors, survivors):
    bits, total = session.codec.bits, torch.zeros(vectors[0].numel(), dtype=torch.int64)
    for i in survivors:
        total = reduce(total + session.codec.quantize(vectors[i], _rounding(i)), bits)
    return total


def _spread_drops(session: Session, count: int) -> set[int]:
    """Greedily drop clients while every neighbourhood keeps t holders (SecAgg+ needs drops
    that do not concentrate in one neighbourhood)."""
    dropped: set[int] = set()
    for c in range(session.num_clients):
        trial = dropped | {c}
        if len(dropped) < count and all(
            len(set(session.holders(h)) - trial) >= session.threshold for h in range(session.num_clients)
        ):
            dropped = trial
    assert len(dropped) == count, "test setup: could not spread the drops"
    return dropped


# --- exactness --------------------------------------------------------------------------------

@pytest.mark.parametrize("neighbours,max_dropout", [(None, 0.3), (10, 0.4)], ids=["secagg", "secagg+k10"])
@pytest.mark.parametrize("drop_fraction", [0.0, 0.1, 0.3])
def test_unmasked_sum_equals_plain_modular_sum(neighbours, max_dropout, drop_fraction):
    config = SecAggConfig(bits=32, clip_range=1.0, max_dropout=max_dropout, neighbours=neighbours)
    session = Session.create(N, config, seed=0)
    dropped = _spread_drops(session, round(drop_fraction * N))
    vectors = _vectors(N, DIM)
    session, result = _run(vectors, config, dropped=dropped)
    survivors = [i for i in range(N) if i not in dropped]
    assert result.survivors == tuple(survivors)
    assert torch.equal(result.int_sum, _plain_modular_sum(session, vectors, survivors))
    float_sum = torch.stack([vectors[i] for i in survivors]).sum(0)
    assert (result.total - float_sum).abs().max() <= len(survivors) * session.codec.step


@pytest.mark.parametrize("bits", [16, 62])  # the smallest ring, and the int64 edge
def test_silent_survivor_is_summed_and_others_answer_for_it(bits):
    config = SecAggConfig(bits=bits, max_dropout=0.3)
    vectors = _vectors(10, 200)
    session, result = _run(vectors, config, dropped={2}, silent={5})
    survivors = [i for i in range(10) if i != 2]
    assert torch.equal(result.int_sum, _plain_modular_sum(session, vectors, survivors))


def test_secure_sum_matches_float_sum_with_dropouts():
    vectors = _vectors(10, 300, seed=1, scale=0.5)
    dropped = {0, 4, 9}
    out = secure_sum(vectors, dropped, bits=40, clip_range=1.0, max_dropout=0.3, seed=7)
    codec = FixedPoint.for_summands(40, 1.0, 10)
    ref = torch.stack([v for i, v in enumerate(vectors) if i not in dropped]).sum(0)
    assert out.dtype == torch.float64
    assert (out - ref).abs().max() <= 7 * codec.step


def test_weighted_mean():
    vectors, weights = _vectors(4, 50, seed=2), [0.1, 0.5, 0.25, 1.0]
    session, clients, server, inboxes = _setup(4, SecAggConfig(max_dropout=0.0))
    masked = _mask_all(clients, server, vectors, weights=weights)
    request = server.request_unmasking(masked)
    result = server.unmask(masked, {i: clients[i].respond(request, inboxes[i]) for i in range(4)})
    ref = sum(w * v for w, v in zip(weights, vectors)) / sum(weights)
    assert result.weight_sum == pytest.approx(sum(weights))
    assert (result.mean() - ref).abs().max() <= 4 * session.codec.step / sum(weights)


# --- quantization -----------------------------------------------------------------------------

def test_quantization_is_unbiased():
    codec = FixedPoint(bits=32, clip_range=1.0, levels=10)  # step 0.1: rounding noise is large
    x, count = 0.33, 100_000
    q = codec.quantize(torch.full((count,), x), torch.Generator().manual_seed(0))
    decoded = codec.dequantize_sum(q, 1)
    assert decoded.unique().tolist() == pytest.approx([0.3, 0.4])
    sigma = codec.step * math.sqrt(0.3 * 0.7 / count)  # Bernoulli(0.3) rounding up
    assert abs(decoded.mean().item() - x) < 5 * sigma  # round-to-nearest would be 200 sigma off


def test_quantization_clips_and_wraps_negatives():
    codec = FixedPoint(bits=16, clip_range=2.0, levels=4)
    q = codec.quantize(torch.tensor([-5.0, -2.0, 0.0, 2.0, 9.0]), torch.Generator().manual_seed(0))
    assert q.tolist() == [2**16 - 4, 2**16 - 4, 0, 4, 4]
    assert codec.dequantize_sum(reduce(q + q, 16), 2).tolist() == [-4.0, -4.0, 0.0, 4.0, 4.0]


def test_overflow_of_n_times_range_is_refused():
    with pytest.raises(ValueError, match=r"10 clients.*10000.*bits=16"):
        Session.create(10, SecAggConfig(bits=16, levels=10_000), seed=0)
    codec = FixedPoint(bits=16, clip_range=1.0, levels=1000)
    codec.check_capacity(32)  # 32 * 1000 < 2^15
    with pytest.raises(ValueError, match="overflow"):
        codec.dequantize_sum(torch.zeros(3, dtype=torch.int64), 33)


# --- masks look uniform -----------------------------------------------------------------------

def _chi_square_p(values: torch.Tensor, bins: int) -> float:
    counts = torch.bincount(values, minlength=bins).to(torch.float64)
    expected = values.numel() / bins
    stat = ((counts - expected) ** 2 / expected).sum()
    return torch.special.gammaincc(torch.tensor((bins - 1) / 2, dtype=torch.float64), stat / 2).item()


def test_masked_update_is_uniform():
    bits, dim = 32, 1 << 16
    session, clients, server, _ = _setup(3, SecAggConfig(bits=bits))
    zeros = torch.zeros(dim)  # the most structured input there is
    y = clients[0].mask(zeros, server.keys_for(0), generator=_rounding(0)).vector
    assert y.min() >= 0 and y.max() < 1 << bits
    assert _chi_square_p(y >> (bits - 8), 256) > 1e-3  # top byte
    assert _chi_square_p(y & 255, 256) > 1e-3  # bottom byte
    m = float(1 << bits)
    assert abs(y.double().mean().item() - m / 2) < 5 * m / math.sqrt(12 * dim)
    assert y.double().var().item() == pytest.approx(m**2 / 12, rel=0.02)
    # the check can fail: the unmasked encoding of a near-constant vector is far from uniform
    q = session.codec.quantize(torch.full((dim,), 0.1), _rounding(0))
    assert _chi_square_p(q >> (bits - 8), 256) < 1e-3


def test_prg_is_deterministic_per_seed_and_in_range():
    a, b = expand_mask(b"\x01" * 32, 500, 20), expand_mask(b"\x02" * 32, 500, 20)
    assert torch.equal(a, expand_mask(b"\x01" * 32, 500, 20)) and not torch.equal(a, b)
    assert a.dtype == torch.int64 and a.min() >= 0 and a.max() < 1 << 20


def test_key_agreement_is_symmetric():
    rng = SeededBytes(0)
    ska, skb, skc = (keys.new_private_key(rng) for _ in range(3))
    ab = keys.agree(ska, keys.public_key(skb))
    assert ab == keys.agree(skb, keys.public_key(ska)) and len(ab) == 32
    assert ab != keys.agree(ska, keys.public_key(skc))


# --- Shamir -----------------------------------------------------------------------------------

def test_any_t_shares_reconstruct_and_t_minus_1_do_not():
    secret, t = int.from_bytes(b"\xab" * 32, "big"), 4
    shares = shamir.split(secret, xs=range(1, 8), threshold=t, rng=SeededBytes(3))
    for subset in itertools.combinations(shares, t):
        assert shamir.reconstruct(subset) == secret
    for subset in itertools.combinations(shares, t - 1):
        assert shamir.reconstruct(subset) != secret
    assert shamir.reconstruct(shares) == secret


def test_shamir_refuses_bad_points_and_thresholds():
    with pytest.raises(ValueError, match="distinct and non-zero"):
        shamir.split(5, xs=[0, 1, 2], threshold=2, rng=SeededBytes(0))
    with pytest.raises(ValueError, match="threshold=4"):
        shamir.split(5, xs=[1, 2, 3], threshold=4, rng=SeededBytes(0))
    with pytest.raises(ValueError, match="distinct"):
        shamir.reconstruct([shamir.Share(1, 2), shamir.Share(1, 3)])


@pytest.mark.parametrize("holders,max_dropout,expected", [
    (10, 0.3, 7), (10, 0.0, 10), (2, 0.3, 2), (100, 0.29, 71), (7, 0.49, 4),
])
def test_threshold_formula(holders, max_dropout, expected):
    assert threshold(holders, max_dropout) == expected
    assert expected > holders / 2


# --- dropouts and the invariant ---------------------------------------------------------------

def test_boundary_of_tolerated_dropouts():
    vectors = _vectors(10, 20)  # t = 10 - floor(0.3 * 10) = 7
    secure_sum(vectors, {0, 1, 2}, max_dropout=0.3)  # 7 survivors: fine
    with pytest.raises(SecAggError, match=r"only 6 of 10 clients survived.*t=7.*max_dropout=0.3"):
        secure_sum(vectors, {0, 1, 2, 3}, max_dropout=0.3)


def test_concentrated_dropouts_in_a_secagg_plus_neighbourhood_are_refused():
    config = SecAggConfig(max_dropout=0.3, neighbours=6)  # 7 holders, t = 5
    session = Session.create(12, config, seed=0)
    victim = 0
    dropped = set(sorted(session.neighbours[victim])[:3])
    with pytest.raises(SecAggError, match=f"share holders of client {victim}.*t=5"):
        _run(_vectors(12, 10), config, dropped=dropped)


def test_too_many_silent_holders_are_refused():
    with pytest.raises(SecAggError, match="shares of client .* threshold t=7"):
        _run(_vectors(10, 10), SecAggConfig(max_dropout=0.3), dropped={0}, silent={1, 2, 3})


def test_request_naming_a_client_both_survived_and_dropped_is_refused():
    with pytest.raises(SecAggError, match=r"clients \[2\] .* both"):
        UnmaskRequest(survivors=frozenset({0, 1, 2}), dropped=frozenset({2, 3}))


def test_client_refuses_a_forged_request():
    session, clients, server, inboxes = _setup(4, SecAggConfig(max_dropout=0.0))
    forged = object.__new__(UnmaskRequest)  # skip __post_init__ like a malicious server would
    object.__setattr__(forged, "survivors", frozenset({0, 1, 2, 3}))
    object.__setattr__(forged, "dropped", frozenset({3}))
    with pytest.raises(SecAggError, match="both"):
        clients[0].respond(forged, inboxes[0])


def test_server_refuses_both_secrets_of_one_client():
    session, clients, server, inboxes = _setup(5, SecAggConfig(max_dropout=0.3))
    masked = _mask_all(clients, server, _vectors(5, 10), dropped={4})
    request = server.request_unmasking(masked)
    honest = {i: clients[i].respond(request, inboxes[i]) for i in request.survivors}
    # holder 1 also hands over its share of survivor 0's mask key: the server must not take it
    leaky = UnmaskResponse(1, honest[1].self_seeds, {**honest[1].mask_keys, 0: inboxes[1][0].mask_key})
    with pytest.raises(SecAggError, match="did not ask for"):
        server.unmask(masked, {**honest, 1: leaky})
    # ... nor a self-seed share of the dropped client 4
    leaky = UnmaskResponse(1, {**honest[1].self_seeds, 4: inboxes[1][4].self_seed}, honest[1].mask_keys)
    with pytest.raises(SecAggError, match="did not ask for"):
        server.unmask(masked, {**honest, 1: leaky})
    # ... nor any answer from the dropped client
    with pytest.raises(SecAggError, match="only surviving holders"):
        server.unmask(masked, {**honest, 4: clients[4].respond(request, inboxes[4])})


def test_tampered_key_share_is_detected():
    session, clients, server, inboxes = _setup(5, SecAggConfig(max_dropout=0.3))
    masked = _mask_all(clients, server, _vectors(5, 10), dropped={4})
    request = server.request_unmasking(masked)
    responses = {i: clients[i].respond(request, inboxes[i]) for i in request.survivors}
    bad = responses[0].mask_keys[4]
    responses[0] = UnmaskResponse(0, responses[0].self_seeds, {4: shamir.Share(bad.x, bad.y + 1)})
    with pytest.raises(SecAggError, match="inconsistent"):
        server.unmask(masked, responses)


# --- configuration and graph ------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    ({"bits": 8}, "bits=8"), ({"bits": 63}, "bits=63"), ({"clip_range": 0.0}, "clip_range=0.0"),
    ({"max_dropout": 0.5}, "max_dropout=0.5"), ({"neighbours": 0}, "neighbours=0"), ({"levels": 0}, "levels=0"),
])
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SecAggConfig(**kwargs)


def test_session_rejects_neighbours_that_do_not_fit():
    with pytest.raises(ValueError, match=r"neighbours=12 .* \[1, 9\]"):
        Session.create(10, SecAggConfig(neighbours=12), seed=0)
    with pytest.raises(ValueError, match="k or n even"):
        Session.create(9, SecAggConfig(neighbours=3), seed=0)


@pytest.mark.parametrize("n,k", [(10, 4), (10, 3), (9, 4), (7, 6), (8, 7), (20, 10)])
def test_harary_graph_is_k_regular_and_symmetric(n, k):
    graph = harary_neighbours(n, k, torch.Generator().manual_seed(n * k))
    assert all(len(nb) == k and i not in nb for i, nb in enumerate(graph))
    assert all(i in graph[j] for i, nb in enumerate(graph) for j in nb)


# --- NamedTensors -----------------------------------------------------------------------------

def test_flatten_unflatten_round_trip():
    tree = {
        "w": torch.randn(3, 4, generator=torch.Generator().manual_seed(0)),
        "b": torch.tensor([1.5, -2.25], dtype=torch.float16),
        "s": torch.tensor(0.75, dtype=torch.bfloat16),
        "d": torch.arange(6, dtype=torch.float64).reshape(1, 2, 3),
    }
    vec, layout = flatten(tree)
    assert vec.dtype == torch.float64 and vec.shape == (12 + 2 + 1 + 6,)
    back = unflatten(vec, layout)
    assert list(back) == list(tree)
    for name, t in tree.items():
        assert back[name].dtype == t.dtype and back[name].shape == t.shape and torch.equal(back[name], t)


def test_mask_refuses_non_finite_vectors():
    session, clients, server, _ = _setup(3, SecAggConfig())
    with pytest.raises(ValueError, match="NaN or infinite"):
        clients[0].mask(torch.tensor([0.0, float("nan")]), server.keys_for(0), generator=_rounding(0))


def test_flatten_refuses_integers_and_unflatten_wrong_length():
    with pytest.raises(ValueError, match=r"not floating: \['n'\]"):
        flatten({"n": torch.ones(2, dtype=torch.int64)})
    _, layout = flatten({"a": torch.zeros(3)})
    with pytest.raises(ValueError, match="3 elements"):
        unflatten(torch.zeros(4, dtype=torch.float64), layout)

