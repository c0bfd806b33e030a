"""Vision: a tiny ViT pre-trained centrally on a public image share, then federated."""

from __future__ import annotations

import pytest

from fedfm.errors import ModelError
from fedfm.experiment import Experiment
from fedfm.runner import run

VISION = ['model.name="vit-tiny"', 'data.name="mnist-5k"', "data.max_examples=2000", "data.test_by_group=false",
          'partition.method="dirichlet"', "partition.alpha=1.0", "federation.clients=4",
          "federation.clients_per_round=4", "client.max_steps=15", "client.batch_size=32", "client.lr=2e-3"]


def test_ffm_vit_learns_digits(tmp_path, tiny_cfg):
    cfg = tiny_cfg(*VISION, 'data.public="share"', "schedule.central_steps=15", "federation.rounds=2")
    summary = run(cfg, tmp_path / "r")
    assert summary["initial_accuracy"] < 0.2 and summary["accuracy"] > 0.35  # 10 classes: chance is 0.1
    assert summary["bytes_up"] > 0


def test_vit_lora_sends_only_adapters(tiny_cfg):
    exp = Experiment.build(tiny_cfg(*VISION, 'adapter.method="lora"', 'adapter.targets=["q_proj", "v_proj"]'))
    assert all("lora_" in n or "classifier" in n for n in exp.handle.trainable)


@pytest.mark.parametrize("model,data", [("vit-tiny", "rotten-tomatoes"), ("tiny-bert", "mnist-5k")])
def test_modality_mismatch_refused(tiny_cfg, model, data):
    with pytest.raises(ModelError, match="takes"):
        Experiment.build(tiny_cfg(f'model.name="{model}"', f'data.name="{data}"', "data.test_by_group=false"))
