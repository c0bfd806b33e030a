"""Switch policies decide exactly what their rule says, on scripted histories."""

from __future__ import annotations

import pytest

from fedfm.errors import ConfigError
from fedfm.schedule import AdaptivePolicy, BanditPolicy, Budget, FixedPolicy, Stage, current_phase, decide


def _hist(*items):
    return [Stage(kind=k, val_loss=l, cost=c) for k, l, c in items]


def _drive(policy, losses_by_kind, n, budget=Budget()):
    """Run a policy against scripted loss sequences (one per kind); returns the kinds played."""
    hist, pos = [], {"central": 0, "federated": 0}
    loss = 1.0
    for _ in range(n):
        d = decide(policy, budget, hist, 1.0)
        if d.kind is None:
            break
        seq = losses_by_kind[d.kind]
        loss = loss - seq[min(pos[d.kind], len(seq) - 1)]
        pos[d.kind] += 1
        hist.append(Stage(d.kind, loss, 100.0))
    return [s.kind[0] for s in hist]


def test_fixed_cycles_pattern():
    p = FixedPolicy((("central", 1), ("federated", 3)))
    kinds = _drive(p, {"central": [0.0], "federated": [0.0]}, 9)
    assert "".join(kinds) == "cfffcfffc"


def test_fixed_rejects_bad_phases():
    with pytest.raises(ConfigError):
        FixedPolicy((("central", 0),))


def test_adaptive_switches_exactly_at_plateau():
    # central improves by 0.1, 0.1, then 0.001 per stage: with window 1, threshold 0.01, patience 1
    # the third central stage shows improvement 0.001 < 0.01, so the fourth stage is federated.
    p = AdaptivePolicy(start="central", threshold=0.01, window=1, patience=1, min_phase=1)
    kinds = _drive(p, {"central": [0.1, 0.1, 0.001], "federated": [0.05, 0.05, 0.0]}, 8)
    assert "".join(kinds[:6]) == "cccfff"
    assert kinds[6] == "c"  # federated plateaued at its 3rd round (improvement 0 < 0.01)


def test_adaptive_patience_needs_consecutive_strikes():
    hist = _hist(("central", 1.0, 1), ("central", 0.9, 1), ("central", 0.899, 1))
    assert AdaptivePolicy(window=1, patience=2, threshold=0.01).next_stage(hist).kind == "central"
    hist.append(Stage("central", 0.8985, 1))
    d = AdaptivePolicy(window=1, patience=2, threshold=0.01).next_stage(hist)
    assert d.kind == "federated" and "threshold" in d.reason


def test_adaptive_window_compares_w_evaluations_back():
    # improvements per stage 0.006 each: window 1 sees 0.006 < 0.01 (switch), window 2 sees 0.012 (stay)
    hist = _hist(("federated", 1.0, 1), ("federated", 0.994, 1), ("federated", 0.988, 1))
    assert AdaptivePolicy(window=1, threshold=0.01).next_stage(hist).kind == "central"
    assert AdaptivePolicy(window=2, threshold=0.01).next_stage(hist).kind == "federated"


def test_adaptive_min_phase_holds_phase():
    hist = _hist(("central", 1.0, 1), ("federated", 1.0, 1), ("federated", 1.0, 1))
    assert AdaptivePolicy(window=1, min_phase=3).next_stage(hist).kind == "federated"
    assert AdaptivePolicy(window=1, min_phase=2).next_stage(hist).kind == "central"


def test_budget_stops_runs():
    p = FixedPolicy((("federated", 1),))
    assert len(_drive(p, {"central": [0], "federated": [0.01]}, 100, Budget(stages=7))) == 7
    assert len(_drive(p, {"central": [0], "federated": [0.01]}, 100, Budget(compute=450))) == 5
    mixed = FixedPolicy((("central", 1), ("federated", 1)))
    kinds = _drive(mixed, {"central": [0], "federated": [0]}, 100, Budget(federated_rounds=3))
    assert kinds.count("f") == 3 and kinds[-1] == "f"


def test_bandit_explores_both_then_prefers_better_per_cost():
    p = BanditPolicy(start="central", window=3, c=0.0)
    # central improves 0.02 per stage, federated 0.05: after exploring, federated wins
    kinds = _drive(p, {"central": [0.02], "federated": [0.05]}, 8)
    assert kinds[:2] == ["c", "f"] and set(kinds[2:]) == {"f"}


def test_bandit_accounts_for_cost():
    # federated improves more per stage but costs 10x: per example, central is better
    hist = _hist(("central", 0.98, 10), ("federated", 0.93, 100))
    assert BanditPolicy(c=0.0).next_stage(hist, initial_loss=1.0).kind == "central"


def test_bandit_exploration_bonus_revisits_stale_arm():
    hist = [Stage("central", 1.0, 1), Stage("central", 0.99, 1)]
    hist += [Stage("federated", 0.99 - 0.011 * (i + 1), 1) for i in range(30)]
    assert BanditPolicy(c=0.0).next_stage(hist).kind == "federated"
    assert BanditPolicy(c=1.0).next_stage(hist).kind == "central"


def test_policies_are_pure():
    hist = _hist(("central", 1.0, 1), ("central", 0.95, 1), ("federated", 0.9, 1))
    for p in (AdaptivePolicy(), BanditPolicy(), FixedPolicy((("central", 1), ("federated", 2)))):
        assert p.next_stage(list(hist)) == p.next_stage(list(hist))


def test_current_phase():
    hist = _hist(("central", 1, 1), ("federated", 1, 1), ("federated", 1, 1))
    assert len(current_phase(hist)) == 2 and current_phase([]) == []
