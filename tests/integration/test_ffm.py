"""FFM schedules end to end on a tiny model: phases, budgets, policy decisions, resume, compare."""

from __future__ import annotations

import json

import pytest
import torch

from fedfm.checkpoint import load_state
from fedfm.compare import PARADIGMS, run_compare
from fedfm.errors import ConfigError
from fedfm.runner import Callbacks, resume, run
from fedfm.schedule import Stage, build_schedule, decide

FFM = ['data.public="share"', "data.public_fraction=0.3", "schedule.central_steps=3"]
VOLATILE = ("wall_s", "elapsed_s")


def _lines(path):
    return [json.loads(l) for l in (path / "metrics.jsonl").read_text().splitlines()]


def _stable(lines):
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in lines]


def test_fixed_schedule_phases_and_budget(tmp_path, tiny_cfg):
    cfg = tiny_cfg(*FFM, "schedule.rounds_per_phase=2", "federation.rounds=3")
    run(cfg, tmp_path / "r")
    lines = _lines(tmp_path / "r")
    phases = [r["phase"] for r in lines[1:]]
    # central, fed, fed, central, fed: the 3rd federated round ends the run (federation.rounds=3)
    assert phases == ["central", "federated", "federated", "central", "federated"]
    central = [r for r in lines[1:] if r["phase"] == "central"]
    assert all(r["bytes_up"] == 0 and r["bytes_down"] == 0 and r["clients"] == [] for r in central)
    assert all(r["cost"] == 3 * 16 for r in central)  # central_steps x batch_size examples


def test_compute_budget_respected(tmp_path, tiny_cfg):
    cfg = tiny_cfg(*FFM, "schedule.budget_compute=200", "federation.rounds=50")
    run(cfg, tmp_path / "r")
    costs = [r["cost"] for r in _lines(tmp_path / "r")[1:]]
    assert sum(costs[:-1]) < 200 <= sum(costs)  # stops at the first stage that reaches the budget


@pytest.mark.parametrize("policy", ["adaptive", "bandit"])
def test_logged_decisions_follow_the_policy_rule(tmp_path, tiny_cfg, policy):
    cfg = tiny_cfg(*FFM, f'schedule.policy="{policy}"', "schedule.window=1", "schedule.threshold=0.002",
                   "schedule.budget_rounds=7", "federation.rounds=20", "client.lr=3e-3")
    run(cfg, tmp_path / "r")
    lines = _lines(tmp_path / "r")
    pol, budget = build_schedule(cfg)
    hist: list[Stage] = []
    for r in lines[1:]:
        d = decide(pol, budget, hist, lines[0]["val_loss"])
        assert (d.kind, d.reason) == (r["phase"], r["reason"])
        hist.append(Stage(r["phase"], r["val_loss"], r["cost"]))
    assert decide(pol, budget, hist, lines[0]["val_loss"]).kind is None
    assert len(lines) - 1 == 7 and all(r["val_loss"] is not None for r in lines)


def test_resume_across_phase_change(tmp_path, tiny_cfg):
    cfg = tiny_cfg(*FFM, "schedule.rounds_per_phase=2", "federation.rounds=3", 'algorithm.name="fedadam"')
    run(cfg, tmp_path / "full")

    class Killed(Exception):
        pass

    def die(line):
        if line["round"] == 3:  # after central, fed, fed: the next stage switches phase
            raise Killed

    with pytest.raises(Killed):
        run(cfg, tmp_path / "cut", Callbacks(on_round_end=die))
    resume(tmp_path / "cut")
    a, _ = load_state(tmp_path / "full" / "checkpoints")
    b, _ = load_state(tmp_path / "cut" / "checkpoints")
    assert all(torch.equal(a.params[k], b.params[k]) for k in a.params)
    assert _stable(_lines(tmp_path / "full")) == _stable(_lines(tmp_path / "cut"))


def test_public_and_private_roles_are_disjoint(tiny_cfg):
    from fedfm.experiment import prepare_data

    roles = prepare_data(tiny_cfg(*FFM, "data.val_fraction=0.2"))
    sets = [set(roles.public.tolist()), set(roles.test.tolist()), set(roles.val_all.tolist())]
    sets += [set(t.tolist()) for t in roles.train]
    assert sum(len(s) for s in sets) == len(set().union(*sets))
    keys = roles.pool.keys()
    train_keys = {keys[i] for s in sets[:1] + sets[3:] for i in s}
    assert not train_keys & {keys[i] for i in roles.test}


def test_schedule_config_errors(tiny_cfg):
    with pytest.raises(ConfigError, match="no central phase"):
        tiny_cfg('data.public="share"')
    with pytest.raises(ConfigError, match="no public data"):
        tiny_cfg("schedule.central_steps=5")
    with pytest.raises(ConfigError, match="validation"):
        tiny_cfg(*FFM, 'schedule.policy="adaptive"', "data.val_fraction=0.0")


def test_compare_table_has_every_paradigm_and_seed(tmp_path, tiny_cfg):
    cfg = tiny_cfg(*FFM, "federation.rounds=2", "client.max_steps=2")
    rows = run_compare(cfg, [0, 1], tmp_path / "cmp")
    assert [r["paradigm"] for r in rows] == list(PARADIGMS) and all(r["seeds"] == 2 for r in rows)
    for p in PARADIGMS:
        for s in (0, 1):
            summary = json.loads((tmp_path / "cmp" / p / f"seed{s}" / "summary.json").read_text())
            assert summary["seed"] == s
    budget = 2 * 2 * 2 * 16  # rounds x clients_per_round x max_steps x batch
    for p in PARADIGMS:
        costs = [r["cost"] for r in _lines(tmp_path / "cmp" / p / "seed0")[1:]]
        assert sum(costs[:-1]) < budget  # nobody gets more than the shared budget (up to its last stage)
    fl = _lines(tmp_path / "cmp" / "fl" / "seed0")
    assert all(r["phase"] == "federated" for r in fl[1:])
    assert all(r["phase"] == "central" for r in _lines(tmp_path / "cmp" / "central" / "seed0")[1:])
    md = (tmp_path / "cmp" / "table.md").read_text()
    assert all(f"| {p} | 2 |" in md for p in PARADIGMS)
    csv_rows = (tmp_path / "cmp" / "table.csv").read_text().strip().splitlines()
    assert len(csv_rows) == 1 + len(PARADIGMS)
    assert (tmp_path / "cmp" / "accuracy_vs_stage.png").is_file() and (tmp_path / "cmp" / "accuracy_vs_mb.png").is_file()


def test_sweep_runs_grid_and_tabulates(tmp_path):
    from conftest import TINY

    from fedfm.sweep import run_sweep

    rows = run_sweep(None, TINY + ["federation.rounds=1"], ["algorithm.name=fedavg,fedprox", "client.lr=1e-3,2e-3"],
                     [0], tmp_path / "sw")
    assert len(rows) == 4 and {r["algorithm.name"] for r in rows} == {"fedavg", "fedprox"}
    assert len((tmp_path / "sw" / "sweep.md").read_text().strip().splitlines()) == 2 + 4
    with pytest.raises(ConfigError, match="algorithm.name"):  # every combination is checked before any run
        run_sweep(None, TINY, ["algorithm.name=fedavg,nope"], [0], tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
