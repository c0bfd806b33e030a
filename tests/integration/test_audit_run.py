"""`fedfm audit` on finished tiny runs: exact token recovery from an undefended full fine-tuning
update, and what each defense does to it."""

from __future__ import annotations

import json

import pytest

from fedfm.audits.run import audit_run
from fedfm.errors import ConfigError
from fedfm.runner import run

BASE = ('adapter.method="full"', "federation.rounds=1")


def test_undefended_update_reveals_the_batch_tokens_exactly(tmp_path, tiny_cfg):
    run(tiny_cfg(*BASE), tmp_path / "run")
    report = audit_run(tmp_path / "run", client=1, batch_size=2, members=50)
    inv = report["inversion"]
    assert inv["kind"].startswith("text: token set") and inv["precision"] == inv["recall"] == 1.0
    assert inv["baseline_f1"] < 0.1
    m = report["membership"]
    assert 0.0 <= m["auc"] <= 1.0 and m["num_members"] == m["num_nonmembers"] == 50
    assert json.loads((tmp_path / "run" / "audit.json").read_text())["inversion"]["f1"] == 1.0


def test_local_dp_noise_and_secure_aggregation_hide_the_batch(tmp_path, tiny_cfg):
    run(tiny_cfg(*BASE, 'privacy.mechanism="local"', "privacy.noise_multiplier=1.0"), tmp_path / "ldp")
    noisy = audit_run(tmp_path / "ldp", batch_size=2, members=20)["inversion"]
    assert noisy["precision"] < 0.05  # noise touches every embedding row: the row set is the vocabulary
    run(tiny_cfg(*BASE, "secagg.enabled=true", "federation.clients_per_round=4"), tmp_path / "sa")
    summed = audit_run(tmp_path / "sa", batch_size=2, members=20)["inversion"]
    assert summed["observed"].startswith("sum") and summed["recall"] == 1.0 and summed["precision"] < 1.0


def test_audit_refuses_what_is_not_a_run(tmp_path):
    with pytest.raises(ConfigError, match="not a run directory"):
        audit_run(tmp_path)
