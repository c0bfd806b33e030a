"""Simulated system heterogeneity: tiers, availability, deadlines, FedBuff schedule."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from fedfm.errors import ConfigError
from fedfm.system import (
    Arrival, AsyncSchedule, ClientTier, DeadlinePlan, SystemProfile, assign_tiers, plan_deadline,
    staleness_weight,
)


def _profile(speeds, **kw):
    kw.setdefault("availability", 1.0)
    return SystemProfile.build(len(speeds), seed=0, speed=list(speeds), **kw)


# ---------------------------------------------------------------------------- tiers

@pytest.mark.parametrize("n, shares, counts", [
    (10, [0.5, 0.3, 0.2], [5, 3, 2]),
    (10, [0.7, 0.2, 0.1], [7, 2, 1]),
    (7, [0.5, 0.3, 0.2], [4, 2, 1]),          # 3.5 2.1 1.4 -> +1 to the largest remainder .5
    (11, [0.25, 0.25, 0.5], [3, 3, 5]),       # 2.75 2.75 5.5 -> +1 to the two .75s
    (4, [1 / 3, 1 / 3, 1 / 3], [2, 1, 1]),    # tie -> the earlier tier
    (3, [0.6, 0.4], [2, 1]),
    (2, [0.2, 0.2, 0.6], [1, 0, 1]),          # 0.4 0.4 1.2 -> floors 0 0 1, +1 to the first .4
])
def test_tier_counts_largest_remainder(n, shares, counts):
    tier = assign_tiers(n, shares, seed=3)
    assert tier.shape == (n,)
    assert np.bincount(tier, minlength=len(shares)).tolist() == counts


def test_tier_assignment_is_a_seeded_permutation():
    a = assign_tiers(20, [0.5, 0.5], seed=1)
    assert a.tolist() == assign_tiers(20, [0.5, 0.5], seed=1).tolist()
    assert a.tolist() != assign_tiers(20, [0.5, 0.5], seed=2).tolist()
    assert a.tolist() != sorted(a.tolist())  # shuffled, not blocks


@pytest.mark.parametrize("shares, needle", [
    ([0.5, 0.6], "sum to 1"),
    ([0.5, 0.4], "0.4"),
    ([1.2, -0.2], "-0.2"),
    ([1.0, 0.0], "positive"),
    ([], "empty"),
])
def test_bad_shares(shares, needle):
    with pytest.raises(ConfigError, match=needle):
        assign_tiers(10, shares, seed=0)


def test_profile_with_tiers():
    tiers = [ClientTier(share=0.75, speed=2.0, rank=8), ClientTier(share=0.25, speed=0.5, rank=2)]
    p = SystemProfile.build(8, seed=5, speed="tiers", availability=1.0, tiers=tiers)
    assert np.bincount(p.tier).tolist() == [6, 2]
    for c in range(8):
        assert p.speed[c] == tiers[p.tier[c]].speed
        assert p.rank_of(c) == tiers[p.tier[c]].rank
        assert p.step_time(c) == pytest.approx(1.0 / tiers[p.tier[c]].speed)
    assert p.tier.tolist() == assign_tiers(8, [0.75, 0.25], seed=5).tolist()
    # tiers with an explicit speed: ranks still come from the tiers
    q = SystemProfile.build(8, seed=5, speed=1.0, availability=1.0, tiers=tiers)
    assert q.speed.tolist() == [1.0] * 8 and q.rank_of(0) in (8, 2)
    assert _profile([1.0]).rank_of(0) is None and _profile([1.0]).tier is None


# ---------------------------------------------------------------------------- profile

def test_speed_length_mismatch_names_both_lengths():
    with pytest.raises(ConfigError, match=r"3 values.*4 clients"):
        SystemProfile.build(4, seed=0, speed=[1.0, 1.0, 1.0], availability=1.0)


def test_speed_tiers_needs_tiers_and_bad_strings_rejected():
    with pytest.raises(ConfigError, match="needs tiers"):
        SystemProfile.build(4, seed=0, speed="tiers", availability=1.0)
    with pytest.raises(ConfigError, match="'fast'"):
        SystemProfile.build(4, seed=0, speed="fast", availability=1.0)
    with pytest.raises(ConfigError, match="-1.0"):
        SystemProfile.build(2, seed=0, speed=[1.0, -1.0], availability=1.0)


@pytest.mark.parametrize("availability, needle", [
    (0.0, r"\(0, 1\].*0\.0"),
    (1.5, "1.5"),
    ([0.5, 1.2], "1.2"),
    ([0.5, -0.1], "-0.1"),
    ([0.5, 0.5, 0.5], r"3 values.*2 clients"),
])
def test_bad_availability(availability, needle):
    with pytest.raises(ConfigError, match=needle):
        SystemProfile.build(2, seed=0, speed=1.0, availability=availability)


def test_bad_step_and_bandwidth():
    with pytest.raises(ConfigError, match="step_s"):
        SystemProfile.build(2, seed=0, speed=1.0, availability=1.0, step_s=0.0)
    with pytest.raises(ConfigError, match="bandwidth"):
        SystemProfile.build(2, seed=0, speed=1.0, availability=1.0, bandwidth=-5.0)


def test_step_and_client_time():
    p = SystemProfile.build(2, seed=0, speed=[1.0, 0.5], availability=1.0, step_s=2.0, bandwidth=50.0)
    assert p.step_time(0) == 2.0 and p.step_time(1) == 4.0
    assert p.client_time(1, 3, bytes_down=100, bytes_up=50) == pytest.approx(12.0 + 3.0)
    free = _profile([0.5], step_s=2.0)
    assert free.client_time(0, 3, bytes_down=10**9, bytes_up=10**9) == 12.0  # no bandwidth: free
    with pytest.raises(ValueError):
        p.step_time(2)


def test_profile_arrays_read_only_and_json_roundtrip():
    tiers = [ClientTier(0.5, 1.0, 4), ClientTier(0.5, 0.25, None)]
    p = SystemProfile.build(6, seed=9, speed="tiers", availability=[0.1, 0.2, 0.3, 0.4, 0.5, 1.0],
                            step_s=0.3, bandwidth=1e6, tiers=tiers)
    with pytest.raises(ValueError):
        p.speed[0] = 3.0
    data = json.loads(json.dumps(p.to_json()))
    q = SystemProfile.from_json(data)
    assert q.to_json() == p.to_json()
    assert q.tiers == p.tiers
    assert q.available(7, range(6)) == p.available(7, range(6))


# ---------------------------------------------------------------------------- availability

def test_availability_frequency_matches_probability():
    probs = [0.1, 0.5, 0.9, 1.0, 0.0]
    p = SystemProfile.build(5, seed=11, speed=1.0, availability=probs)
    rounds = 4000
    counts = np.zeros(5)
    for r in range(rounds):
        for c in p.available(r, range(5)):
            counts[c] += 1
    for c, q in enumerate(probs):
        sigma = math.sqrt(rounds * q * (1 - q))
        assert abs(counts[c] - rounds * q) <= 5 * sigma, (c, counts[c], q)
    assert counts[3] == rounds and counts[4] == 0


def test_availability_is_deterministic_and_per_client():
    p = SystemProfile.build(50, seed=2, speed=1.0, availability=0.5)
    a = p.available(3, range(50))
    assert a == p.available(3, range(50))
    assert a == SystemProfile.build(50, seed=2, speed=1.0, availability=0.5).available(3, range(50))
    assert a != p.available(4, range(50))
    assert a != SystemProfile.build(50, seed=3, speed=1.0, availability=0.5).available(3, range(50))
    # a client's draw does not depend on who else is asked; order is kept
    assert p.available(3, [40, 7, 1]) == [c for c in [40, 7, 1] if c in a]
    assert 0 < len(a) < 50


# ---------------------------------------------------------------------------- deadlines

def _three():
    return _profile([1.0, 0.5, 0.25], step_s=1.0)


def test_deadline_drop():
    plan = plan_deadline(_three(), [0, 1, 2], 4, deadline=8.0, stragglers="drop")
    assert isinstance(plan, DeadlinePlan)
    assert plan.steps == {0: 4, 1: 4}
    assert list(plan.dropped) == [2]
    assert "2 of 4 steps" in plan.dropped[2]
    assert plan.round_time == 8.0


def test_deadline_partial():
    plan = plan_deadline(_three(), [0, 1, 2], {0: 4, 1: 4, 2: 4}, deadline=8.0, stragglers="partial")
    assert plan.steps == {0: 4, 1: 4, 2: 2}
    assert plan.dropped == {}
    assert plan.round_time == 8.0


def test_no_deadline_and_generous_deadline():
    plan = plan_deadline(_three(), [0, 1, 2], 4, deadline=None, stragglers="drop")
    assert plan.steps == {0: 4, 1: 4, 2: 4} and plan.dropped == {} and plan.round_time == 16.0
    # nobody is cut: the round ends when the slowest participant is done, not at the deadline
    plan = plan_deadline(_three(), [0, 1], 4, deadline=100.0, stragglers="drop")
    assert plan.steps == {0: 4, 1: 4} and plan.round_time == 8.0


def test_deadline_partial_zero_steps_is_dropped():
    plan = plan_deadline(_three(), [0, 2], 4, deadline=3.0, stragglers="partial")
    assert plan.steps == {0: 3}
    assert "0 of 4 steps" in plan.dropped[2]
    assert plan.round_time == 3.0


def test_deadline_exact_multiple_not_lost_to_float_error():
    p = _profile([1.0], step_s=0.1)
    assert 0.3 / 0.1 < 3  # float error the plan must absorb
    plan = plan_deadline(p, [0], 3, deadline=0.3, stragglers="drop")
    assert plan.steps == {0: 3} and plan.dropped == {}


def test_deadline_empty_cohort_and_bad_args():
    assert plan_deadline(_three(), [], 4, deadline=8.0, stragglers="drop") == DeadlinePlan({}, {}, 0.0)
    with pytest.raises(ConfigError, match="'wait'"):
        plan_deadline(_three(), [0], 4, deadline=8.0, stragglers="wait")
    with pytest.raises(ConfigError, match="deadline"):
        plan_deadline(_three(), [0], 4, deadline=0.0, stragglers="drop")
    with pytest.raises(ValueError, match="client 1"):
        plan_deadline(_three(), [0, 1], {0: 4}, deadline=8.0, stragglers="drop")
    with pytest.raises(ValueError, match="duplicate"):
        plan_deadline(_three(), [0, 0], 4, deadline=8.0, stragglers="drop")


def test_deadline_with_bandwidth():
    p = _profile([1.0, 1.0], step_s=1.0, bandwidth=100.0)
    # 200 bytes down = 2 s, leaving 4 s of the 6 s deadline: 4 steps fit exactly
    plan = plan_deadline(p, [0, 1], 4, deadline=6.0, stragglers="drop", bytes_down=200)
    assert plan.steps == {0: 4, 1: 4} and plan.round_time == 6.0
    # 5 s deadline: 3 of 4 steps
    plan = plan_deadline(p, [0], 4, deadline=5.0, stragglers="partial", bytes_down=200)
    assert plan.steps == {0: 3} and plan.round_time == 5.0
    plan = plan_deadline(p, [0], 4, deadline=5.0, stragglers="drop", bytes_down=200)
    assert "3 of 4 steps" in plan.dropped[0]
    # an upload estimate also takes from the budget and counts in the round time
    plan = plan_deadline(p, [0], 4, deadline=7.0, stragglers="drop", bytes_down=200, bytes_up=100)
    assert plan.steps == {0: 4} and plan.round_time == 7.0
    plan = plan_deadline(p, [0], 4, deadline=6.5, stragglers="partial", bytes_down=200, bytes_up=100)
    assert plan.steps == {0: 3} and plan.round_time == 6.5
    # download alone longer than the deadline
    plan = plan_deadline(p, [0], 4, deadline=6.0, stragglers="partial", bytes_down=700)
    assert plan.steps == {} and "transfers alone" in plan.dropped[0]
    # no deadline: communication adds to the round time
    plan = plan_deadline(p, [0, 1], 4, deadline=None, stragglers="drop", bytes_down=200, bytes_up=100)
    assert plan.round_time == pytest.approx(4.0 + 2.0 + 1.0)


# ---------------------------------------------------------------------------- staleness weights

def test_staleness_weights():
    for tau in range(0, 30):
        assert staleness_weight(tau) == pytest.approx(1 / math.sqrt(1 + tau))
        assert staleness_weight(tau, "polynomial", a=1.0) == pytest.approx(1 / (1 + tau))
        assert staleness_weight(tau, "constant") == 1.0
        expected = 1.0 if tau <= 10 else 1 / (0.5 * (tau - 10) + 1)
        assert staleness_weight(tau, "hinge", a=0.5, b=10) == pytest.approx(expected)
    assert staleness_weight(0) == 1.0
    assert staleness_weight(5, "hinge", a=2.0, b=3) == pytest.approx(1 / (2 * 2 + 1))


@pytest.mark.parametrize("kw", [
    {"staleness": -1}, {"staleness": 1.5}, {"staleness": 1, "kind": "linear"},
    {"staleness": 1, "a": -0.5}, {"staleness": 12, "kind": "hinge", "b": -1},
])
def test_staleness_weight_rejects_bad_input(kw):
    with pytest.raises(ValueError):
        staleness_weight(**kw)


# ---------------------------------------------------------------------------- async schedule

def _arr(client, version, staleness, start, finish, steps=2):
    return Arrival(client=client, version=version, staleness=staleness, start=start, finish=finish, steps=steps)


def test_async_hand_computed_sequence():
    # step times 1, 2, 4, 5 s; 2 steps each -> 2, 4, 8, 10 s of work
    sched = AsyncSchedule.start(_profile([1.0, 0.5, 0.25, 0.2]), concurrency=4, seed=0)
    assert sched.dispatch(sched.version, 2) == [0, 1, 2, 3]
    assert sched.next_buffer(2) == [_arr(0, 0, 0, 0.0, 2.0), _arr(1, 0, 0, 0.0, 4.0)]
    assert (sched.clock, sched.version) == (4.0, 1)
    assert sched.dispatch(sched.version, 2) == [0, 1]            # start at 4 from version 1
    # c0 at 6; c1 (v1) and c2 (v0) both at 8: tie -> lower id
    assert sched.next_buffer(2) == [_arr(0, 1, 0, 4.0, 6.0), _arr(1, 1, 0, 4.0, 8.0)]
    assert (sched.clock, sched.version) == (8.0, 2)
    assert sched.dispatch(sched.version, 2) == [0, 1]            # c0 -> 10, c1 -> 12
    # c2 (v0) at 8 is stale by 2; c0 (v2) and c3 (v0) tie at 10 -> c0
    assert sched.next_buffer(2) == [_arr(2, 0, 2, 0.0, 8.0), _arr(0, 2, 0, 8.0, 10.0)]
    assert (sched.clock, sched.version) == (10.0, 3)
    assert sched.dispatch(sched.version, 2) == [0, 2]            # c0 -> 12, c2 -> 18
    assert sched.next_buffer(2) == [_arr(3, 0, 3, 0.0, 10.0), _arr(0, 3, 0, 10.0, 12.0)]
    assert (sched.clock, sched.version) == (12.0, 4)
    assert sorted(e["client"] for e in sched.inflight) == [1, 2]
    assert sched.dispatch(sched.version, 2) == [0, 3]
    assert sched.dispatches == 5


def test_async_buffer_of_one_with_bandwidth_and_step_map():
    p = _profile([1.0, 2.0], step_s=1.0, bandwidth=10.0)
    sched = AsyncSchedule.start(p, concurrency=2, seed=0)
    assert sched.dispatch(0, {0: 3, 1: 4}, bytes_down=10, bytes_up=20) == [0, 1]
    # c0: 3 + 1 + 2 = 6; c1: 4 * 0.5 + 3 = 5
    a = sched.next_buffer(1)
    assert a == [Arrival(1, 0, 0, 0.0, 5.0, 4)] and sched.clock == 5.0 and sched.version == 1
    assert sched.dispatch(1, {0: 3, 1: 4}, bytes_down=10, bytes_up=20) == [1]   # 5 -> 10
    assert sched.next_buffer(1) == [Arrival(0, 0, 1, 0.0, 6.0, 3)]
    assert sched.next_buffer(1) == [Arrival(1, 1, 1, 5.0, 10.0, 4)]
    assert (sched.clock, sched.version) == (10.0, 3)


def test_async_respects_availability_exclude_and_concurrency():
    p = SystemProfile.build(6, seed=1, speed=1.0, availability=[1.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    sched = AsyncSchedule.start(p, concurrency=3, seed=4)
    for k in range(20):
        new = sched.dispatch(k, 1, exclude={3})
        assert not set(new) & {1, 3, 4}
        assert len(sched.inflight) == 3
        assert len({e["client"] for e in sched.inflight}) == 3
        sched.next_buffer(1 + k % 2)


def test_async_too_few_in_flight():
    sched = AsyncSchedule.start(_profile([1.0, 1.0, 1.0]), concurrency=2, seed=0)
    sched.dispatch(0, 1)
    with pytest.raises(ValueError, match="only 2 clients in flight"):
        sched.next_buffer(3)
    with pytest.raises(ConfigError):
        AsyncSchedule.start(_profile([1.0]), concurrency=0, seed=0)


def _run(sched, iterations, steps, log):
    for _ in range(iterations):
        while len(sched.inflight) < 3:
            sched.dispatch(sched.version, steps, bytes_down=1000)
        log.append(sched.next_buffer(3))


def test_async_json_resume_continues_identically():
    p = SystemProfile.build(12, seed=7, speed=[0.3 + 0.1 * c for c in range(12)],
                            availability=0.6, step_s=0.7, bandwidth=3e3)
    steps = {c: 1 + c % 4 for c in range(12)}
    full: list = []
    uninterrupted = AsyncSchedule.start(p, concurrency=5, seed=3)
    _run(uninterrupted, 15, steps, full)

    resumed: list = []
    first = AsyncSchedule.start(p, concurrency=5, seed=3)
    _run(first, 6, steps, resumed)
    state = json.loads(json.dumps(first.to_json()))
    second = AsyncSchedule.from_json(state)
    assert second.to_json() == first.to_json()
    _run(second, 9, steps, resumed)

    assert resumed == full
    assert second.to_json() == uninterrupted.to_json()
    assert max(a.staleness for buf in full for a in buf) > 0   # the run exercised staleness
    assert len({a.client for buf in full for a in buf}) > 5    # and more than the first cohort
