"""Pre-training tasks: masked LM on an encoder, causal LM on a decoder, on Shakespeare."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedfm.config import load_config
from fedfm.data.tokenized import LMTexts, tokenize
from fedfm.errors import ConfigError, ModelError
from fedfm.experiment import Experiment
from fedfm.runner import run

LM = ['data.name="shakespeare-characters"', "data.max_examples=400", "data.test_by_group=false",
      'partition.method="natural"', "federation.rounds=2", "federation.clients_per_round=4",
      "client.max_steps=6", "client.lr=3e-3"]


@pytest.mark.parametrize("task,model", [("mlm", "tiny-bert"), ("clm", "tiny-llama")])
def test_lm_loss_decreases(tmp_path, tiny_cfg, task, model):
    summary = run(tiny_cfg(*LM, f'task="{task}"', f'model.name="{model}"'), tmp_path / "r")
    assert summary["perplexity"] < 0.8 * summary["initial_perplexity"]
    assert summary["accuracy"] is None


def test_clm_lora_sends_only_adapters(tiny_cfg):
    exp = Experiment.build(tiny_cfg(*LM, 'task="clm"', 'model.name="tiny-llama"', 'adapter.method="lora"',
                                    'adapter.targets=["q_proj", "v_proj"]'))
    assert exp.handle.trainable and all("lora_" in n for n in exp.handle.trainable)


def test_mlm_masking_follows_bert_recipe():
    class Tok:
        pad_token_id = 0

        def __call__(self, texts, **kw):
            ids = torch.randint(5, 1000, (len(texts), 64))
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    tokens = tokenize(["x"] * 400, np.zeros(400), Tok(), 64)
    data = LMTexts(tokens=tokens, objective="mlm", mask_id=3, vocab_size=1000, special_ids=(0, 1, 2, 3))
    b = data.batch(np.arange(400), np.random.default_rng(1))
    chosen = b["labels"] != -100
    n = int(chosen.sum())
    assert abs(n / chosen.numel() - 0.15) < 0.01  # 25,600 tokens: sd of the share ~0.002
    masked = int((b["input_ids"][chosen] == 3).sum())
    assert abs(masked / n - 0.8) < 0.03
    assert torch.equal(b["labels"][chosen], tokens.input_ids[chosen])
    again = data.batch(np.arange(400), np.random.default_rng(1))
    assert torch.equal(again["input_ids"], b["input_ids"])  # seeded


def test_clm_labels_ignore_padding():
    class Tok:
        pad_token_id = 0

        def __call__(self, texts, **kw):
            ids = torch.tensor([[5, 6, 7, 0], [5, 6, 0, 0]])
            return {"input_ids": ids, "attention_mask": (ids != 0).long()}

    data = LMTexts(tokens=tokenize(["a", "b"], np.zeros(2), Tok(), 4), objective="clm", mask_id=0,
                   vocab_size=10, special_ids=(0,))
    b = data.batch(np.arange(2))
    assert b["labels"].tolist() == [[5, 6, 7], [5, 6, -100]]  # cut to the longest example


@pytest.mark.parametrize("task,model,match", [("mlm", "tiny-llama", "causal decoder"),
                                              ("clm", "tiny-bert", "bidirectional encoder")])
def test_incompatible_model_task_refused(tiny_cfg, task, model, match):
    with pytest.raises(ModelError, match=match):
        Experiment.build(tiny_cfg(*LM, f'task="{task}"', f'model.name="{model}"'))


def test_lm_config_errors():
    with pytest.raises(ConfigError, match="no labels"):
        load_config(None, ['task="mlm"', 'partition.method="dirichlet"'])
    with pytest.raises(ConfigError, match="head"):
        load_config(None, ['task="clm"', 'adapter.method="head"'])


def test_corpus_refused_for_classification(tiny_cfg):
    from fedfm.errors import DataError

    with pytest.raises(DataError, match="mlm or clm"):
        Experiment.build(tiny_cfg('data.name="shakespeare"'))
