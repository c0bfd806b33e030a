"""Bad input fails with a clear error, before training."""

from __future__ import annotations

import pytest

from fedfm.errors import ConfigError, DataError, ModelError
from fedfm.experiment import Experiment


def test_fewer_examples_than_clients(tiny_cfg):
    with pytest.raises(DataError, match="federation.clients"):
        Experiment.build(tiny_cfg("data.max_examples=20", "federation.clients=30", "federation.clients_per_round=2"))


def test_unknown_dataset(tiny_cfg):
    with pytest.raises(DataError, match="unknown dataset 'imdb'.*rotten-tomatoes"):
        Experiment.build(tiny_cfg('data.name="imdb"'))


def test_missing_local_file(tiny_cfg, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        Experiment.build(tiny_cfg(f'data.name="{tmp_path}/x.csv"'))


def test_unknown_model(tiny_cfg):
    with pytest.raises(ModelError, match="not a preset.*tiny-bert"):
        Experiment.build(tiny_cfg('model.name="no-such-org/no-such-model"'))


def test_bad_lora_targets(tiny_cfg):
    with pytest.raises(ConfigError, match="not modules of this model"):
        Experiment.build(tiny_cfg('adapter.method="lora"', 'adapter.targets=["q_proj"]'))


def test_local_csv_with_missing_column(tiny_cfg, tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("sentence,label\nhello,1\nbye,0\n")
    with pytest.raises(DataError, match="no column 'text'.*sentence"):
        Experiment.build(tiny_cfg(f'data.name="{p}"'))


def test_local_csv_works(tiny_cfg, tmp_path):
    p = tmp_path / "d.csv"
    rows = "".join(f"great movie number {i},pos,g{i % 5}\n" if i % 2 else f"awful film {i},neg,g{i % 5}\n" for i in range(80))
    p.write_text("text,label,site\n" + rows)
    exp = Experiment.build(tiny_cfg(f'data.name="{p}"', 'data.group_column="site"', 'partition.method="natural"',
                                    "data.max_examples=80"))
    assert exp.data.label_names == ["neg", "pos"] and len(exp.data.train) == 4


def test_images_refuse_language_modelling_and_prompt_tuning(tiny_cfg):
    """An image dataset with task mlm/clm, and a prompt method on an image model, are refused with
    the reason (not a peft or attribute error)."""
    from fedfm.errors import ConfigError, DataError
    from fedfm.experiment import Experiment

    with pytest.raises(DataError, match="holds images; task 'clm'"):
        Experiment.build(tiny_cfg('task="clm"', 'model.name="tiny-llama"', 'data.name="mnist-5k"',
                                  "data.test_by_group=false"))
    with pytest.raises(ConfigError, match="takes images. Allowed here: full, head, lora"):
        Experiment.build(tiny_cfg('model.name="vit-tiny"', 'data.name="mnist-5k"', "data.test_by_group=false",
                                  'adapter.method="prompt"'))
