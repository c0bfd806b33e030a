"""An interrupted run resumed from its checkpoint equals an uninterrupted run, bit for bit."""

from __future__ import annotations

import json

import pytest
import torch

from fedfm.checkpoint import load_state
from fedfm.errors import ConfigError
from fedfm.runner import Callbacks, resume, run

VOLATILE = ("wall_s", "elapsed_s")


class Killed(Exception):
    pass


def _lines(path):
    return [{k: v for k, v in json.loads(l).items() if k not in VOLATILE} for l in path.read_text().splitlines()]


@pytest.mark.parametrize("algorithm", ["fedavg", "fedadam", "scaffold"])
def test_resume_equals_uninterrupted(tmp_path, tiny_cfg, algorithm):
    # scaffold: the clients' control variates are client state, checkpointed with the server's
    sgd = ['client.optimizer="sgd"', "client.lr=0.05"] if algorithm == "scaffold" else []
    cfg = tiny_cfg("federation.rounds=3", f'algorithm.name="{algorithm}"', 'adapter.method="lora"',
                   "adapter.dropout=0.1", *sgd)
    run(cfg, tmp_path / "full")

    def die_after_round_2(line):
        if line["round"] == 2:
            raise Killed

    with pytest.raises(Killed):
        run(cfg, tmp_path / "cut", Callbacks(on_round_end=die_after_round_2))
    assert load_state(tmp_path / "cut" / "checkpoints")[0].round == 2
    resume(tmp_path / "cut")

    a, _ = load_state(tmp_path / "full" / "checkpoints")
    b, _ = load_state(tmp_path / "cut" / "checkpoints")
    assert a.round == b.round == 3
    assert all(torch.equal(a.params[k], b.params[k]) for k in a.params)
    assert all(torch.equal(a.opt_state[k], b.opt_state[k]) for k in a.opt_state)
    assert _lines(tmp_path / "full" / "metrics.jsonl") == _lines(tmp_path / "cut" / "metrics.jsonl")


def test_kill_mid_round_loses_only_that_round(tmp_path, tiny_cfg):
    """A kill inside round 2 (after some clients trained) resumes from round 1's state."""
    cfg = tiny_cfg("federation.rounds=2")
    seen = []

    def die_in_round_2(result):
        seen.append(result.client_id)
        if len(seen) == 3:  # 2 clients in round 1, then the first of round 2
            raise Killed

    with pytest.raises(Killed):
        run(cfg, tmp_path / "r", Callbacks(on_client=die_in_round_2))
    assert load_state(tmp_path / "r" / "checkpoints")[0].round == 1
    summary = resume(tmp_path / "r")
    assert summary["rounds"] == 2
    assert [l["round"] for l in _lines(tmp_path / "r" / "metrics.jsonl")] == [0, 1, 2]


def test_run_refuses_existing_run_dir(tmp_path, tiny_cfg):
    cfg = tiny_cfg("federation.rounds=1")
    run(cfg, tmp_path / "r")
    with pytest.raises(ConfigError, match="already holds a run"):
        run(cfg, tmp_path / "r")


def test_resume_needs_a_run_dir(tmp_path):
    with pytest.raises(ConfigError, match="not a run directory"):
        resume(tmp_path)


def test_every_module_trains_from_the_start(tiny_cfg):
    """from_pretrained leaves modules in eval mode and peft adds its own in train mode; the handle
    puts the whole tree in one mode, so the first round trains with dropout exactly as a round
    after an evaluation does (a resumed run once trained its first round without dropout)."""
    from fedfm.experiment import Experiment

    exp = Experiment.build(tiny_cfg('model.name="minilm-l6"', 'adapter.method="lora"'))  # from_pretrained
    assert all(m.training for m in exp.handle.model.modules())
