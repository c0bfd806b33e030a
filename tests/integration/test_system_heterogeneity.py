"""Speeds, availability, deadlines and FedBuff through the real round loop."""

from __future__ import annotations

import json

import pytest
import torch

from fedfm.aggregators.mean import WeightedMean
from fedfm.algorithms import build_algorithm
from fedfm.config import AlgorithmConfig
from fedfm.errors import ConfigError
from fedfm.federation import SystemPlan
from fedfm.round import RoundPlan, run_round
from fedfm.runner import Callbacks, run
from fedfm.runtime.inprocess import InProcessRuntime
from fedfm.system import SystemProfile
from fedfm.types import ServerState

FOUR = ["federation.clients=4", "federation.clients_per_round=4", "client.max_steps=3"]


def _lines(path):
    return [json.loads(l) for l in (path / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("stragglers", ["drop", "partial"])
def test_deadline_drops_or_cuts_exactly_the_stragglers(tmp_path, tiny_cfg, stragglers):
    # speeds 1, 1, 0.5, 0.25 at 1 s per step: 3 steps take 3, 3, 6, 12 s; the deadline is 4 s
    cfg = tiny_cfg(*FOUR, "clients.speed=[1, 1, 0.5, 0.25]", "federation.deadline=4",
                   f'federation.stragglers="{stragglers}"', "federation.rounds=1")
    steps = {}
    run(cfg, tmp_path / "r", Callbacks(on_client=lambda r: steps.__setitem__(r.client_id, r.metrics["steps"])))
    line = _lines(tmp_path / "r")[1]
    assert line["sim_time_s"] == 4.0
    if stragglers == "drop":
        assert steps == {0: 3.0, 1: 3.0}
        assert [r["client"] for r in line["rejected"]] == [2, 3]
        assert all("straggler" in r["reason"] and "deadline" in r["reason"] for r in line["rejected"])
    else:  # 4 s buys 2 steps at speed 0.5 and 1 at speed 0.25
        assert steps == {0: 3.0, 1: 3.0, 2: 2.0, 3: 1.0}
        assert line["rejected"] == []


def test_no_deadline_round_lasts_as_long_as_the_slowest(tmp_path, tiny_cfg):
    cfg = tiny_cfg(*FOUR, "clients.speed=[1, 1, 0.5, 0.25]", "clients.step_s=0.5", "federation.rounds=2")
    run(cfg, tmp_path / "r")
    assert [l["sim_time_s"] for l in _lines(tmp_path / "r")[1:]] == [6.0, 12.0]


def test_unavailable_clients_drop_out(tmp_path, tiny_cfg):
    cfg = tiny_cfg(*FOUR, "clients.availability=[1, 0, 1, 0]", "federation.rounds=2")
    run(cfg, tmp_path / "r")
    for line in _lines(tmp_path / "r")[1:]:
        assert line["clients"] == [0, 2]
        assert [r["client"] for r in line["rejected"]] == [1, 3]
        assert all("unavailable" in r["reason"] for r in line["rejected"])


class ConstantTrainer:
    """Client c's update is (c + 1) * ones, whatever it was sent (a scripted client)."""

    algorithm = build_algorithm(AlgorithmConfig(name="fedavg"))

    def train_many(self, tasks):
        return [({"w": t.params["w"] + (t.client_id + 1.0)}, {"train_loss": 0.0, "steps": 2.0, "num_examples": 1.0})
                for t in tasks]


def test_fedbuff_applies_staleness_weights():
    """x_{v+1} = x_v + (1/K) sum_i (1 + tau_i)^-0.5 delta_i, with the arrivals the schedule gives."""
    n, k = 4, 2
    profile = SystemProfile.build(n, 0, [1.0, 0.5, 0.25, 1.0], 1.0)
    system = SystemPlan(profile=profile, planned_steps={c: 2 for c in range(n)}, mode="async", buffer=k,
                        concurrency=3)
    alg = ConstantTrainer.algorithm
    plan = RoundPlan(algorithm=alg, aggregator=WeightedMean(), runtime=InProcessRuntime(ConstantTrainer()),
                     num_clients=n, clients_per_round=k, seed=0, system=system)
    state = ServerState(round=0, params={"w": torch.zeros(1, dtype=torch.float64)})
    expect, seen = 0.0, []
    for _ in range(5):
        state, rep = run_round(state, plan)
        assert len(rep.clients) == k
        expect += sum((c + 1.0) * (1 + s) ** -0.5 for c, s in zip(rep.clients, rep.staleness)) / k
        seen += list(rep.staleness)
        assert float(state.params["w"]) == pytest.approx(expect, abs=1e-12)
    assert max(seen) >= 1  # some update was stale, so the weights were not all 1
    assert state.extra["sim_time"] == rep.sim_time > 0


def test_async_run_resumes_with_its_updates_in_flight(tiny_cfg, interrupted_equals_full):
    a = interrupted_equals_full(tiny_cfg(*FOUR, 'federation.mode="async"', "federation.buffer=2",
                                         "federation.concurrency=3", "clients.speed=[1, 0.5, 0.25, 1]",
                                         "federation.rounds=4", 'adapter.method="lora"'))
    assert any(max(l.get("staleness", [0])) > 0 for l in a[1:])
    assert [l["sim_time_s"] for l in a[1:]] == sorted(l["sim_time_s"] for l in a[1:])


@pytest.mark.parametrize("overrides, match", [
    (["clients.speed=[1, 2]"], "2 values but there are 4 clients"),
    (["clients.availability=1.5"], "availability"),
    (['clients.speed="tiers"'], "tiers"),
    (['federation.mode="async"', "federation.buffer=5"], "buffer"),
    (['federation.mode="async"', "federation.deadline=3"], "deadline"),
    (['federation.mode="async"', 'aggregator.name="median"'], "mean"),
])
def test_bad_system_settings_refused(tiny_cfg, overrides, match):
    with pytest.raises(ConfigError, match=match):
        tiny_cfg(*FOUR, *overrides)


def test_transfer_time_follows_each_clients_own_bytes(tmp_path, tiny_cfg):
    """With a bandwidth, a client's simulated time is its steps plus its own download and (estimated)
    upload: a rank-2 client moves fewer bytes than a rank-8 one."""
    cfg = tiny_cfg("federation.clients=2", "federation.clients_per_round=2", "client.max_steps=3",
                   'adapter.method="lora"', "adapter.rank=[2, 8]", "clients.bandwidth=1e5", "federation.rounds=1")
    seen = {}
    run(cfg, tmp_path / "r", Callbacks(on_client=lambda r: seen.__setitem__(r.client_id, r)))
    line = _lines(tmp_path / "r")[1]
    assert seen[0].bytes_down < seen[1].bytes_down
    # uncompressed replies: the upload estimate is the client's own params, what it then sent
    expect = max(r.metrics["steps"] * 1.0 + (r.bytes_down + r.bytes_up) / 1e5 for r in seen.values())
    assert line["sim_time_s"] == pytest.approx(expect, rel=1e-9)
