"""End to end on real Rotten Tomatoes text with tiny random-init models."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedfm.experiment import prepare_data
from fedfm.runner import run


@pytest.mark.slow
def test_tiny_bert_learns_above_majority_baseline(tmp_path, tiny_cfg):
    cfg = tiny_cfg("data.max_examples=3000", "data.test_fraction=0.2", "federation.clients=6",
                   "federation.clients_per_round=6", "federation.rounds=4", "client.epochs=2",
                   "client.max_steps=60", "client.lr=2e-3", "client.batch_size=32", "eval.every=4")
    summary = run(cfg, tmp_path / "r")
    roles = prepare_data(cfg)
    majority = np.bincount(roles.pool.labels[roles.test]).max() / len(roles.test)
    assert summary["accuracy"] > majority + 0.03, (summary["accuracy"], majority)
    for name in ("config.toml", "metrics.jsonl", "summary.json", "metrics.png", "checkpoints/state.json"):
        assert (tmp_path / "r" / name).is_file()
    line = json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[-1])
    for key in ("round", "phase", "train_loss", "loss", "accuracy", "f1", "bytes_up", "bytes_down", "clients", "wall_s"):
        assert key in line


def test_tiny_llama_classifies_with_lora(tmp_path, tiny_cfg):
    summary = run(tiny_cfg('model.name="tiny-llama"', 'adapter.method="lora"', 'adapter.targets=["q_proj", "v_proj"]',
                         "federation.rounds=1"), tmp_path / "r")
    assert summary["rounds"] == 1 and 0.0 <= summary["accuracy"] <= 1.0
    assert summary["trainable_params"] < summary["total_params"]


def test_per_client_eval(tmp_path, tiny_cfg):
    summary = run(tiny_cfg("eval.per_client=true", "federation.rounds=1"), tmp_path / "r")
    line = json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[-1])
    assert len(line["client_accuracy"]) == 4 and summary["rounds"] == 1


@pytest.mark.parametrize("algorithm", ["fedprox", "fedavgm", "fedyogi", "fedadagrad"])
def test_every_algorithm_runs(tmp_path, tiny_cfg, algorithm):
    summary = run(tiny_cfg(f'algorithm.name="{algorithm}"', "federation.rounds=1"), tmp_path / "r")
    assert summary["rounds"] == 1 and summary["loss"] == summary["loss"]
