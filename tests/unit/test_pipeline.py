"""The update pipeline against references: bytes against the wire serialization of the payload,
clipped norms against the bound, the identity where nothing should change, error-feedback mass
conservation per client, central aggregation and accounting against formulas and dp_accounting,
the SecAgg mean against the plain weighted mean, and the config rules.

Tolerances: float32 sums 1e-6 absolute; secure aggregation n fixed-point steps (the stochastic
rounding of n summands); epsilons 1e-9 relative (the same dp_accounting events); noise moments
5 standard errors.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import dp_accounting as dp
import pytest
import torch

from fedfm import wire
from fedfm.checkpoint import load_client_states, load_state, save_state
from fedfm.compression import ErrorFeedback, Quantize, TopK, payload_bytes
from fedfm.config import load_config
from fedfm.errors import ConfigError
from fedfm.pipeline import UpdatePipeline, build_pipeline
from fedfm.privacy import AdaptiveClip, epsilon_after, global_norm
from fedfm.runtime.client import train_client
from fedfm.runtime.inprocess import InProcessRuntime
from fedfm.secagg import FixedPoint
from fedfm.tensors import weighted_sum
from fedfm.types import ClientResult, ClientTask, ModelUpdate, ServerState

logging.getLogger("absl").setLevel(logging.ERROR)  # dp_accounting's RDP series warnings


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads only add contention


def _params() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"enc.weight": torch.randn(64, 48, generator=g), "enc.bias": torch.randn(48, generator=g),
            "head.weight": torch.randn(2, 48, generator=g)}


def _delta(scale: float, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * scale for k, v in _params().items()}


class FakeTrainer:
    """'Trains' by adding a fixed per-client delta to the task's params."""

    def __init__(self, deltas: dict[int, dict[str, torch.Tensor]]):
        self.deltas = deltas

    def train_many(self, tasks):
        return [({k: v + self.deltas[t.client_id][k] for k, v in t.params.items()},
                 {"train_loss": 0.5, "num_examples": 10.0 + t.client_id, "examples_seen": 10.0}) for t in tasks]


def _pipe(*overrides: str) -> UpdatePipeline:
    return build_pipeline(load_config(None, ['federation.clients=4', 'federation.clients_per_round=4', *overrides]))


def _task(client: int = 0, rnd: int = 1, clip: float | None = None, seed: int = 7) -> ClientTask:
    return ClientTask(round=rnd, client_id=client, params=_params(), seed=seed + client,
                      payload={} if clip is None else {"clip": clip})


def _result(client: int, delta: dict[str, torch.Tensor], n: float, **metrics: float) -> ClientResult:
    return ClientResult(client_id=client, update=ModelUpdate(delta, n, int(n)), metrics={"num_examples": n, **metrics},
                        bytes_up=0, bytes_down=0)


# ------------------------------------------------------------------------------------- client side


@pytest.mark.parametrize("compression", ['"none"', '"topk"', '"quantize"', '"lowrank"', '["topk", "quantize"]'])
def test_bytes_sent_are_the_payload_bytes(compression):
    pipe = _pipe(f"compression.name={compression}", "compression.fraction=0.1", 'privacy.mechanism="local"',
                 "privacy.noise_multiplier=0.5")
    task, delta = _task(clip=1.0), _delta(0.1)
    reply = train_client(FakeTrainer({0: delta}), task, pipe)
    payload = pipe.client_step({k: (task.params[k] + delta[k]) - task.params[k] for k in delta}, task, None).payload
    assert len(reply.up) == payload_bytes(payload) == len(wire.encode(payload))
    # and the size is what the codec's declared layout serializes to, whatever the values
    layout = {k: torch.zeros(m.shape, dtype=m.dtype) for k, m in pipe.compressor.payload_like(_params()).items()}
    assert len(reply.up) == payload_bytes(layout)
    assert all(torch.equal(a, b) for a, b in zip(wire.decode(reply.up).values(), payload.values()))


@pytest.mark.parametrize("mechanism", ["central", "local"])
def test_clipped_update_norm_is_at_most_the_clip(mechanism):
    pipe = _pipe(f'privacy.mechanism="{mechanism}"', "privacy.noise_multiplier=0")
    big, small = _delta(1.0), _delta(1e-3)
    assert global_norm(big) > 3.0 > 0.3 > global_norm(small)
    out = pipe.client_step(big, _task(clip=0.3), None)
    # only central DP's trusted server learns the clipped bit; local DP sends nothing norm-derived
    bit = (lambda b: {"clipped": b}) if mechanism == "central" else (lambda b: {})
    assert global_norm(out.payload) <= 0.3 and out.metrics == bit(1.0)
    # the direction is kept: clipping only scales
    scale = float(out.payload["enc.bias"][0] / big["enc.bias"][0])
    assert all(torch.allclose(out.payload[k], big[k] * scale, rtol=1e-5, atol=1e-8) for k in big)
    assert pipe.client_step(small, _task(clip=0.3), None).metrics == bit(0.0)


@pytest.mark.parametrize("privacy", [(), ('privacy.mechanism="central"', "privacy.noise_multiplier=0"),
                                     ('privacy.mechanism="local"', "privacy.noise_multiplier=0")])
def test_identity_below_the_clip_without_noise_or_compression(privacy):
    pipe = _pipe(*privacy)
    delta = _delta(1e-3)
    task = _task(clip=1.0) if privacy else _task()
    out = pipe.client_step(delta, task, None)
    assert list(out.payload) == list(delta) and all(torch.equal(out.payload[k], delta[k]) for k in delta)
    assert out.state is None


def test_clipping_pipeline_needs_the_clip_in_the_task():
    with pytest.raises(ValueError, match="payload\\['clip'\\]"):
        _pipe('privacy.mechanism="central"', "privacy.noise_multiplier=1").client_step(_delta(1.0), _task(), None)


def test_local_noise_has_std_z_times_clip_and_is_seeded():
    z, c = 0.5, 2.0
    pipe = _pipe('privacy.mechanism="local"', f"privacy.noise_multiplier={z}", f"privacy.clip={c}")
    delta = _delta(1e-3)
    out = pipe.client_step(delta, _task(clip=c), None)
    noise = torch.cat([(out.payload[k] - delta[k]).reshape(-1).double() for k in delta])
    n = noise.numel()
    assert abs(float(noise.mean())) < 5 * z * c / math.sqrt(n)
    assert abs(float(noise.std()) - z * c) < 5 * z * c / math.sqrt(2 * n)
    again = pipe.client_step(delta, _task(clip=c), None).payload
    other = pipe.client_step(delta, _task(clip=c, seed=8), None).payload
    assert all(torch.equal(out.payload[k], again[k]) for k in delta)
    assert not torch.equal(out.payload["enc.weight"], other["enc.weight"])


def test_non_finite_update_is_not_sent():
    delta = dict(_delta(0.1), **{"enc.bias": torch.full((48,), float("nan"))})
    residual = {"enc.weight": torch.ones(64, 48)}
    out = _pipe('compression.name="topk"').client_step(delta, _task(), residual)
    assert out.payload is None and "NaN" in out.error and torch.equal(out.state["enc.weight"], residual["enc.weight"])


def test_topk_error_feedback_state_is_carried_per_client():
    """Client 0 takes part in two rounds, client 1 in one: each keeps its own residual, and what the
    server decodes plus the residual adds up to what the client trained (error feedback's invariant)."""
    deltas = {0: _delta(0.1, seed=1), 1: _delta(0.1, seed=2)}
    pipe = _pipe('compression.name="topk"', "compression.fraction=0.05")
    runtime = InProcessRuntime(FakeTrainer(deltas), pipe)
    sent: dict[int, list[dict[str, torch.Tensor]]] = {0: [], 1: []}
    for rnd, clients in ((1, (0, 1)), (2, (0,))):
        for r in runtime.run([_task(c, rnd) for c in clients]):
            sent[r.client_id].append(pipe.receive(r, _params()).update.delta)
    assert set(runtime.client_states) == {0, 1}
    for c, rounds in ((0, 2), (1, 1)):
        residual = runtime.client_states[c]
        for k in deltas[c]:
            total = sum(s[k] for s in sent[c]) + residual[k]
            assert torch.allclose(total, rounds * deltas[c][k], atol=1e-6)
        assert sum(int((s["enc.weight"] != 0).sum()) for s in sent[c]) == rounds * TopK(0.05).k(64 * 48)
    assert not torch.equal(runtime.client_states[0]["enc.weight"], runtime.client_states[1]["enc.weight"])


# ------------------------------------------------------------------------------------- server side


def test_receive_rejects_malformed_payloads_with_a_reason():
    pipe = _pipe('compression.name="topk"', "compression.fraction=0.1")
    payload = pipe.client_step(_delta(0.1), _task(), None).payload

    def received(p):
        r = ClientResult(client_id=0, update=None, metrics={"num_examples": 5.0}, bytes_up=1, bytes_down=1, payload=p)
        return pipe.receive(r, _params())

    assert received(payload).update is not None and received(payload).error is None
    missing = received({k: v for k, v in payload.items() if k != "enc.bias.idx"})
    assert missing.update is None and "malformed payload" in missing.error and "enc.bias.idx" in missing.error
    cast = received(dict(payload, **{"enc.bias.val": payload["enc.bias.val"].double()}))
    assert cast.update is None and "float64" in cast.error
    out_of_range = received(dict(payload, **{"enc.bias.idx": payload["enc.bias.idx"] + 10_000}))
    assert out_of_range.update is None and "does not decode" in out_of_range.error


def test_central_aggregate_is_the_fixed_denominator_mean_plus_noise():
    m, c = 4, 0.05
    deltas = [_delta(s, seed=i) for i, s in enumerate((1e-4, 0.1, 1.0))]  # 3 of m = 4 arrive
    results = [_result(i, d, 10.0 * (i + 1)) for i, d in enumerate(deltas)]
    clipped = [{k: v * min(1.0, c / global_norm(d)) for k, v in d.items()} for d in deltas]
    reference = weighted_sum(clipped, [1 / m] * 3)  # uniform weights over the fixed denominator
    quiet = _pipe('privacy.mechanism="central"', "privacy.noise_multiplier=0", f"privacy.clip={c}")
    agg = quiet.aggregate(results, quiet.initial_extra(), 1, aggregator=None)
    assert all(torch.allclose(agg.delta[k], reference[k], atol=1e-7) for k in reference)
    z = 2.0
    noisy = dataclasses.replace(quiet, noise_multiplier=z)
    agg = noisy.aggregate(results, noisy.initial_extra(), 1, aggregator=None)
    noise = torch.cat([(agg.delta[k] - reference[k]).reshape(-1).double() for k in reference])
    std, n = z * c / m, noise.numel()
    assert abs(float(noise.std()) - std) < 5 * std / math.sqrt(2 * n)
    assert abs(float(noise.mean())) < 5 * std / math.sqrt(n)


def test_adaptive_clip_moves_by_the_reported_clipped_bits():
    """Andrew et al. 2021's geometric update, with the count noise off so it is exact."""
    start = AdaptiveClip(clip=0.5, target_quantile=0.5, learning_rate=0.2, count_noise_std=0.0)
    pipe = dataclasses.replace(_pipe('privacy.mechanism="central"', "privacy.noise_multiplier=0"), adaptive=start)
    bits = [1.0, 1.0, 1.0, 0.0]  # 3 of 4 clipped: the clip is too small and grows
    results = [_result(i, _delta(0.01, seed=i), 10.0, clipped=b) for i, b in enumerate(bits)]
    extra = pipe.initial_extra()
    assert pipe.client_payload(extra) == {"clip": 0.5}
    agg = pipe.aggregate(results, extra, 1, aggregator=None)
    expected = 0.5 * math.exp(-0.2 * (1 / 4 - 0.5))
    assert agg.extra["adaptive_clip"]["clip"] == pytest.approx(expected, rel=1e-12)
    assert pipe.client_payload(agg.extra) == {"clip": pytest.approx(expected, rel=1e-12)}


def _secure_pipe(dropout: float = 0.0, central: bool = False) -> UpdatePipeline:
    over = ["secagg.enabled=true", f"secagg.dropout={dropout}"]
    if central:
        over += ['privacy.mechanism="central"', "privacy.noise_multiplier=1.5", "privacy.clip=0.2"]
    return _pipe(*over)


def _step(pipe: UpdatePipeline, n: int) -> float:
    return FixedPoint.for_summands(pipe.secagg.bits, pipe.secagg.clip_range, n).step


def test_secure_aggregate_equals_the_weighted_mean():
    deltas = [_delta(0.05, seed=i) for i in range(4)]
    weights = [10.0, 30.0, 5.0, 55.0]
    results = [_result(i, d, w) for i, (d, w) in enumerate(zip(deltas, weights))]
    pipe = _secure_pipe()
    agg = pipe.aggregate(results, {}, 1, aggregator=None)
    reference = weighted_sum(deltas, [w / sum(weights) for w in weights])
    tol = 4 * _step(pipe, 4) + 1e-7  # n rounding steps, and float32's rounding of the result
    assert agg.dropped == ()
    assert all(float((agg.delta[k] - reference[k]).abs().max()) <= tol for k in reference)
    uniform = dataclasses.replace(pipe, weighting="uniform").aggregate(results, {}, 1, aggregator=None)
    plain = weighted_sum(deltas, [0.25] * 4)
    assert all(float((uniform.delta[k] - plain[k]).abs().max()) <= tol for k in plain)
    assert max(float((agg.delta[k] - plain[k]).abs().max()) for k in plain) > 100 * tol  # the weights matter


def test_secure_aggregate_with_dropouts_is_the_survivors_weighted_mean():
    deltas = [_delta(0.05, seed=i) for i in range(4)]
    weights = [10.0, 30.0, 5.0, 55.0]
    results = [_result(10 + i, d, w) for i, (d, w) in enumerate(zip(deltas, weights))]
    agg = _secure_pipe(dropout=0.3).aggregate(results, {}, 3, aggregator=None)
    assert len(agg.dropped) == 1 and "dropped after masking" in agg.dropped[0]["reason"]
    out = agg.dropped[0]["client"] - 10
    alive = [i for i in range(4) if i != out]
    total = sum(weights[i] for i in alive)
    reference = weighted_sum([deltas[i] for i in alive], [weights[i] / total for i in alive])
    tol = 4 * _step(_secure_pipe(), 4) / (total / sum(weights)) + 1e-7  # the survivors' weight sum is >= their share
    assert all(float((agg.delta[k] - reference[k]).abs().max()) <= tol for k in reference)


def test_central_dp_under_secure_aggregation_equals_central_dp():
    """Secure sum of the clipped updates / m plus the server's noise: the same noise stream as the
    plain central mechanism, so the two agree within the fixed-point steps."""
    deltas = [_delta(s, seed=i) for i, s in enumerate((0.001, 0.3, 0.05, 2.0))]
    results = [_result(i, d, 10.0) for i, d in enumerate(deltas)]
    secure = _secure_pipe(central=True)
    plain = dataclasses.replace(secure, secagg=None)
    # the clients clip before secure aggregation (the server cannot); plain DP re-clips itself
    clipped = [_result(i, secure.client_step(d, _task(i, clip=0.2), None).payload, 10.0) for i, d in enumerate(deltas)]
    a = secure.aggregate(clipped, {}, 2, aggregator=None).delta
    b = plain.aggregate(results, plain.initial_extra(), 2, aggregator=None).delta
    tol = 4 * _step(secure, 4) / 4 + 1e-6
    assert all(float((a[k] - b[k]).abs().max()) <= tol for k in a)
    assert float(b["enc.weight"].std()) > 1.5 * 0.2 / 4 / 2  # the noise is really there


def test_plain_aggregate_uses_the_configured_aggregator():
    class Spy:
        def aggregate(self, updates):
            self.n = len(updates)
            return {"x": torch.ones(1)}

    spy = Spy()
    agg = _pipe().aggregate([_result(i, _delta(0.1), 1.0) for i in range(3)], {"k": 1}, 1, spy)
    assert spy.n == 3 and torch.equal(agg.delta["x"], torch.ones(1)) and agg.extra == {"k": 1} and not agg.dropped


# ------------------------------------------------------------------------------------- accounting


def test_central_accounting_composes_one_sampled_gaussian_per_round():
    pipe = build_pipeline(load_config(None, ["federation.clients=10", "federation.clients_per_round=3",
                                             'privacy.mechanism="central"', "privacy.noise_multiplier=1.3"]))
    extra = pipe.initial_extra()
    for k in range(1, 4):
        extra, eps = pipe.account(extra, [0, 1, 2])
        assert extra["dp_rounds"] == k
        assert eps == pytest.approx(epsilon_after(k, 1.3, 0.3, 1e-5, "rdp"), rel=1e-9)


def test_local_accounting_reports_the_worst_client():
    z = 3.0
    pipe = build_pipeline(load_config(None, ["federation.clients=4", "federation.clients_per_round=2",
                                             'privacy.mechanism="local"', f"privacy.noise_multiplier={z}"]))
    extra = pipe.initial_extra()
    for cohort, worst in (([0, 1], 1), ([1, 2], 2), ([0, 3], 2), ([0, 2], 3)):
        extra, eps = pipe.account(extra, cohort)
        # two updates in the C-ball differ by up to 2C: a Gaussian of multiplier z / 2 per participation
        ref = dp.rdp.RdpAccountant().compose(dp.GaussianDpEvent(z / 2), worst).get_epsilon(1e-5)
        assert eps == pytest.approx(ref, rel=1e-9)
    assert extra["participation"] == [3, 2, 2, 1]


def test_no_mechanism_reports_no_epsilon():
    extra, eps = _pipe().account({}, [0, 1])
    assert eps is None and extra == {}


def test_local_target_epsilon_is_calibrated_over_the_planned_rounds():
    cfg = load_config(None, ['privacy.mechanism="local"', "privacy.target_epsilon=8.0", "federation.rounds=7",
                             "schedule.budget_rounds=5"])
    z = build_pipeline(cfg).noise_multiplier
    eps = dp.rdp.RdpAccountant().compose(dp.GaussianDpEvent(z / 2), 5).get_epsilon(1e-5)
    assert 0.999 * 8.0 <= eps <= 8.0


# ------------------------------------------------------------------------------------- checkpoint


def test_checkpoint_keeps_extra_and_client_states_exactly(tmp_path):
    extra = {"adaptive_clip": dataclasses.asdict(AdaptiveClip(0.1 + 0.2)), "dp_rounds": 3, "participation": [1, 0]}
    states = {2: {"enc.weight": torch.randn(4, 3)}, 0: {"a": torch.randn(2), "b": torch.randn(3).double()}}
    for rnd in (1, 2):
        save_state(tmp_path, ServerState(round=rnd, params=_params(), extra=extra), {"elapsed_s": 1.0}, states)
    state, meta = load_state(tmp_path)
    assert state.round == 2 and state.extra == extra and meta["elapsed_s"] == 1.0
    back = load_client_states(tmp_path, meta)
    assert list(back) == [2, 0] and all(list(back[c]) == list(states[c]) for c in states)
    assert all(torch.equal(back[c][k], states[c][k]) and back[c][k].dtype == states[c][k].dtype
               for c in states for k in states[c])
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == ["clients-00002.safetensors",
                                                                      "state-00002.safetensors"]
    save_state(tmp_path, ServerState(round=3, params=_params()), {})
    assert load_client_states(tmp_path, load_state(tmp_path)[1]) == {} and not list(tmp_path.glob("clients-*"))


# ------------------------------------------------------------------------------------- config rules


def _refused(*overrides: str) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(None, list(overrides))
    return str(e.value)


def test_rule_dpsgd_refuses_fedprox_and_a_second_clip():
    msg = _refused('privacy.mechanism="dpsgd"', "privacy.noise_multiplier=1", 'algorithm.name="fedprox"')
    assert "FedProx" in msg and "per-example" in msg
    msg = _refused('privacy.mechanism="dpsgd"', "privacy.noise_multiplier=1", "client.grad_clip=1.0")
    assert "client.grad_clip" in msg


@pytest.mark.parametrize("given", [(), ("privacy.noise_multiplier=1", "privacy.target_epsilon=3")])
def test_rule_exactly_one_of_noise_multiplier_and_target_epsilon(given):
    msg = _refused('privacy.mechanism="central"', *given)
    assert "exactly one of privacy.noise_multiplier and privacy.target_epsilon" in msg
    assert ("both are set" if given else "neither is set") in msg


@pytest.mark.parametrize("noise", ["privacy.noise_multiplier=1", "privacy.target_epsilon=2"])
def test_rule_noise_needs_clipping(noise):
    msg = _refused(noise)
    assert noise.split("=")[0] in msg and "privacy.mechanism='none'" in msg and "after clipping" in msg
    assert "privacy.clip" in _refused('privacy.mechanism="local"', "privacy.noise_multiplier=1", "privacy.clip=0")


def test_rule_secagg_needs_the_mean():
    msg = _refused("secagg.enabled=true", 'aggregator.name="median"')
    assert "secagg.enabled needs aggregator.name='mean'" in msg and "individual updates" in msg


def test_rule_central_dp_needs_the_mean():
    msg = _refused('privacy.mechanism="central"', "privacy.noise_multiplier=1", 'aggregator.name="trimmed-mean"')
    assert "privacy.mechanism='central' needs aggregator.name='mean'" in msg and "sensitivity" in msg
    load_config(None, ['privacy.mechanism="local"', "privacy.noise_multiplier=1", 'aggregator.name="median"'])


def test_rule_secagg_refuses_compression():
    msg = _refused("secagg.enabled=true", 'compression.name="quantize"')
    assert "secagg.enabled cannot run with compression.name='quantize'" in msg and "dense fixed-point" in msg


def test_rule_adaptive_clip_only_with_central_dp():
    msg = _refused('privacy.mechanism="local"', "privacy.noise_multiplier=1", "privacy.adaptive_clip=true")
    assert "privacy.adaptive_clip needs privacy.mechanism='central'" in msg


def test_rule_adaptive_clip_not_with_secagg():
    msg = _refused('privacy.mechanism="central"', "privacy.noise_multiplier=0.1", "privacy.adaptive_clip=true",
                   "secagg.enabled=true")
    assert "adaptive_clip cannot run with secagg.enabled" in msg and "count of clipped updates" in msg


def test_rule_adaptive_clip_needs_room_for_the_count_noise():
    msg = _refused("federation.clients_per_round=10", 'privacy.mechanism="central"', "privacy.noise_multiplier=1.0",
                   "privacy.adaptive_clip=true")
    assert "must be below clients_per_round / 10 = 1" in msg


def test_rule_compression_chain_is_built_at_load():
    assert "quantize must be the last codec" in _refused('compression.name=["quantize", "topk"]')
    assert "bits must be one of [1, 2, 4, 8]" in _refused('compression.name="quantize"', "compression.bits=3")
    assert "unknown compressor 'gzip'" in _refused('compression.name=["topk", "gzip"]')


def test_rule_secagg_dropout_within_max_dropout():
    msg = _refused("secagg.enabled=true", "secagg.dropout=0.4", "secagg.max_dropout=0.2")
    assert "secagg.dropout=0.4 exceeds secagg.max_dropout=0.2" in msg


def test_valid_combinations_load_and_round_trip():
    from fedfm.config import loads_config, to_toml

    cfg = load_config(None, ['privacy.mechanism="central"', "privacy.noise_multiplier=1", "secagg.enabled=true",
                             'compression.name="none"'])
    assert loads_config(to_toml(cfg)) == cfg
    cfg = load_config(None, ['compression.name=["topk", "quantize"]', "compression.bits=4"])
    assert loads_config(to_toml(cfg)) == cfg
    codec = build_pipeline(cfg).compressor
    assert isinstance(codec, ErrorFeedback) and [type(c) for c in codec.inner.codecs] == [TopK, Quantize]
    assert codec.inner.codecs[1].bits == 4
