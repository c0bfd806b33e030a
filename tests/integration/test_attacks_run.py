"""Attacks and robust aggregation in whole runs of the tiny model, against references."""

from __future__ import annotations

import json

import pytest
import torch

from fedfm.checkpoint import load_state
from fedfm.errors import ConfigError
from fedfm.runner import run


def _final(out):
    return load_state(out / "checkpoints")[0].params


def test_sign_flip_by_every_client_negates_the_round(tmp_path, tiny_cfg):
    base = ["federation.rounds=1", 'adapter.method="lora"']
    run(tiny_cfg(*base), tmp_path / "honest")
    run(tiny_cfg(*base, 'attack.name="sign-flip"', "attack.fraction=1.0"), tmp_path / "flipped")
    from fedfm.experiment import Experiment

    start = Experiment.build(tiny_cfg(*base)).initial_state().params
    honest, flipped = _final(tmp_path / "honest"), _final(tmp_path / "flipped")
    for k in start:
        torch.testing.assert_close(flipped[k] - start[k], -(honest[k] - start[k]), rtol=1e-4, atol=1e-6)


def test_backdoor_run_reports_its_success_rate(tmp_path, tiny_cfg):
    run(tiny_cfg('attack.name="backdoor"', "attack.fraction=0.5", "attack.target_label=1"), tmp_path / "run")
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rates = [l["backdoor_success"] for l in lines if "backdoor_success" in l]
    assert rates and all(0.0 <= r <= 1.0 for r in rates)


@pytest.mark.parametrize("name", ["median", "trimmed-mean", "norm-bound"])
def test_robust_aggregators_run_end_to_end(tmp_path, tiny_cfg, name):
    run(tiny_cfg(f'aggregator.name="{name}"', "aggregator.trim=0.25", "federation.clients_per_round=4"),
        tmp_path / "run")
    assert load_state(tmp_path / "run" / "checkpoints")[0].round == 2


def test_bad_attack_target_is_a_clear_config_error(tmp_path, tiny_cfg):
    from fedfm.experiment import Experiment

    with pytest.raises(ConfigError, match="target_label"):
        Experiment.build(tiny_cfg('attack.name="backdoor"', "attack.fraction=0.5", "attack.target_label=7"))
