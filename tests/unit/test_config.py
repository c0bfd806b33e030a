"""Config loading: strict keys, types and ranges; overrides; round trip; CLI errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedfm.config import DEFAULT_CONFIG, load_config, to_toml
from fedfm.errors import ConfigError


def test_default_loads():
    cfg = load_config(None)
    assert cfg.model.name == "minilm-l6" and cfg.partition.method == "natural"


def test_public_keys_exist():
    cfg = load_config(None)
    for key in ["seed", "model.name", "adapter.method", "adapter.rank", "adapter.alpha", "adapter.targets",
                "data.name", "data.max_examples", "data.test_fraction", "partition.method", "partition.alpha",
                "federation.clients", "federation.clients_per_round", "federation.rounds", "client.epochs",
                "client.max_steps", "client.batch_size", "client.lr", "client.optimizer", "algorithm.name",
                "algorithm.mu", "algorithm.server_lr", "algorithm.momentum", "eval.every"]:
        node = cfg
        for part in key.split("."):
            node = getattr(node, part)  # raises AttributeError if a public key vanished


def test_unknown_key_names_key_and_allowed():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["client.learning_rate=0.1"])
    msg = str(e.value)
    assert "client.learning_rate" in msg and "lr" in msg and "optimizer" in msg


def test_wrong_type_names_key_and_value():
    with pytest.raises(ConfigError) as e:
        load_config(None, ['federation.rounds="many"'])
    assert "federation.rounds" in str(e.value) and "many" in str(e.value)


def test_out_of_range():
    with pytest.raises(ConfigError, match="client.lr"):
        load_config(None, ["client.lr=-1.0"])


def test_literal_lists_allowed_values():
    with pytest.raises(ConfigError) as e:
        load_config(None, ['algorithm.name="fedsgd"'])
    assert "fedsgd" in str(e.value) and "fedyogi" in str(e.value)


def test_cohort_larger_than_clients():
    with pytest.raises(ConfigError, match="clients_per_round"):
        load_config(None, ["federation.clients=3", "federation.clients_per_round=5"])


def test_override_types():
    cfg = load_config(None, ["federation.rounds=3", "client.lr=0.01", 'adapter.targets=["query"]', "data.name=foo.csv"])
    assert cfg.federation.rounds == 3 and cfg.client.lr == 0.01
    assert cfg.adapter.targets == ["query"] and cfg.data.name == "foo.csv"


def test_bad_override_form():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["federation.rounds"])


def test_missing_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("nope/missing.toml")


def test_resolved_round_trip(tmp_path: Path):
    cfg = load_config(None, ["seed=7", "client.max_steps=5"])
    path = tmp_path / "config.toml"
    path.write_text(to_toml(cfg))
    assert load_config(path) == cfg


def test_configs_default_is_the_packaged_default():
    repo = Path(__file__).resolve().parents[2]
    assert (repo / "configs" / "default.toml").read_text() == DEFAULT_CONFIG.read_text()


def test_cli_error_is_one_paragraph_exit_2(tmp_path: Path):
    fedfm = Path(sys.executable).parent / "fedfm"
    proc = subprocess.run([str(fedfm), "run", "--set", "partition.method=\"bogus\"", "--out", str(tmp_path / "r")],
                          capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "partition.method" in proc.stderr and "dirichlet" in proc.stderr
