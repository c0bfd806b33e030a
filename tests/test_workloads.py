"""The benchmark workloads W1 (MLP on digits, 100 clients) and W2 (4-layer BERT on random tokens):
their model presets, datasets and configs."""

from __future__ import annotations

import hashlib
import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fedfm.config import load_config
from fedfm.data.images import to_tensors
from fedfm.data.sources import BUNDLED, load_source
from fedfm.errors import DataError, ModelError
from fedfm.models.load import load_model, load_tokenizer
from fedfm.models.presets import PRESETS, ModelPreset

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits():
    return load_source("digits")


@pytest.fixture(scope="module")
def random_tokens():
    return load_source("random-tokens")


# --------------------------------------------------------------------------- mlp


def test_mlp_builds_with_the_right_shapes():
    model, tok = load_model("mlp", "classify", seed=0, num_labels=10)
    assert tok is None
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert shapes == {"hidden.weight": (128, 64), "hidden.bias": (128,),
                      "classifier.weight": (10, 128), "classifier.bias": (10,)}
    assert model.config.num_labels == 10
    again, _ = load_model("mlp", "classify", seed=0, num_labels=10)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))  # seeded


def test_mlp_loss_is_cross_entropy_of_its_logits():
    model, _ = load_model("mlp", "classify", seed=1, num_labels=10)
    pixels = torch.rand(5, 1, 8, 8) * 2 - 1
    labels = torch.tensor([0, 3, 9, 3, 1])
    out = model(pixel_values=pixels, labels=labels)
    assert out.logits.shape == (5, 10)
    assert torch.allclose(out.loss, torch.nn.functional.cross_entropy(out.logits, labels))
    assert model(pixel_values=pixels).loss is None


def test_mlp_trains_on_digits(digits):
    data = to_tensors(digits)
    model, _ = load_model("mlp", "classify", seed=0, num_labels=digits.num_classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    batch = data.batch(np.arange(0, len(data), 4))  # 450 images
    losses = []
    for _ in range(20):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("task", ["mlm", "clm"])
def test_mlp_refuses_language_modelling(task):
    with pytest.raises(ModelError, match=f"image classifier.*task '{task}'.*allowed task for it: classify"):
        load_model("mlp", task, seed=0)


def test_mlp_names_the_image_size_it_expects():
    model, _ = load_model("mlp", "classify", seed=0, num_labels=10)
    with pytest.raises(ModelError, match=r"64 pixels \(8x8\) but got 784 pixels per image \(28x28\)"):
        model(pixel_values=torch.zeros(2, 1, 28, 28))


def test_a_plain_preset_takes_no_tokenizer():
    with pytest.raises(ValueError, match="plain torch image model"):
        ModelPreset(description="x", tokenizer=lambda: Path("."), build=lambda n, s: None)


def test_mlp_loads_without_transformers_peft_or_sklearn():
    """Start-up is benchmarked: W1's model and data must not pull the heavy libraries."""
    code = ("import sys; from fedfm.models.load import load_model; from fedfm.data.sources import load_source; "
            "load_model('mlp', 'classify', 0, 10); load_source('digits'); "
            "print(sorted(m for m in ('transformers', 'peft', 'sklearn') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------- digits


def test_digits_loads_scikit_learns_images(digits):
    assert len(digits) == 1797 and digits.num_classes == 10
    assert digits.label_names == [str(d) for d in range(10)]
    assert digits.images.shape == (1797, 8, 8) and digits.images.dtype == np.uint8
    assert digits.images.min() == 0 and digits.images.max() == 255
    assert set(np.unique(digits.images)) <= {round(v * 255 / 16) for v in range(17)}
    assert np.bincount(digits.labels).min() >= 170 and not digits.is_test.any()


def test_digits_fetch_has_nothing_to_download():
    path = BUNDLED.get("digits").fetch()
    assert path.is_file() and path.name == "digits.csv.gz"


def test_digits_without_scikit_learn_names_the_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sklearn" else real(name, *a))
    with pytest.raises(DataError, match=r"pip install 'scikit-learn>=1.3'"):
        load_source("digits")


# --------------------------------------------------------------------------- random-tokens


def test_random_tokens_is_fixed(random_tokens):
    again = load_source("random-tokens")
    assert again.texts == random_tokens.texts and np.array_equal(again.labels, random_tokens.labels)
    assert len(random_tokens) == 200 and random_tokens.groups is None
    assert set(random_tokens.labels.tolist()) == {0, 1}
    # the same content on every machine: a digest of the texts and labels, pinned
    digest = hashlib.sha256("\n".join(random_tokens.texts).encode() + random_tokens.labels.astype("<i8").tobytes())
    assert digest.hexdigest() == "bfb019199cd4ed684f720c5ac6289ec1f63837f5fb551fa5de3dd565b305278d"


def test_random_tokens_are_64_tokens_at_max_length_64(random_tokens):
    from fedfm.data.tokenized import tokenize

    tok = load_tokenizer(PRESETS.get("bert-w2"), "bert-w2")
    tokens = tokenize(random_tokens.texts, random_tokens.labels, tok, max_length=64)
    assert tokens.input_ids.shape == (200, 64)
    assert bool((tokens.lengths == 64).all())
    assert bool((tokens.input_ids[:, 0] == tok.cls_token_id).all())
    assert bool((tokens.input_ids[:, -1] == tok.sep_token_id).all())
    assert tok.unk_token_id not in tokens.input_ids


# --------------------------------------------------------------------------- bert-w2


def test_bert_w2_shape_and_parameter_count():
    model, tok = load_model("bert-w2", "classify", seed=0, num_labels=2)
    c = model.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.intermediate_size) == (4, 256, 4, 1024)
    assert c.vocab_size == tok.vocab_size == 30522
    h, i = c.hidden_size, c.intermediate_size
    embeddings = (c.vocab_size + c.max_position_embeddings + c.type_vocab_size) * h + 2 * h
    layer = 4 * (h * h + h) + (h * i + i) + (i * h + h) + 2 * 2 * h  # q, k, v, out; FFN; 2 LayerNorms
    expected = embeddings + c.num_hidden_layers * layer + (h * h + h) + (h * 2 + 2)  # + pooler + classifier
    assert sum(p.numel() for p in model.parameters()) == expected == 11_171_074


# --------------------------------------------------------------------------- configs


def test_bench_configs_load():
    w1 = load_config(CONFIGS / "bench-w1.toml")
    assert (w1.model.name, w1.adapter.method, w1.data.name, w1.partition.method) == ("mlp", "full", "digits", "iid")
    assert (w1.federation.clients, w1.federation.clients_per_round, w1.federation.rounds) == (100, 100, 5)
    assert (w1.client.epochs, w1.client.batch_size, w1.client.optimizer, w1.algorithm.name) == (1, 16, "sgd", "fedavg")
    w2 = load_config(CONFIGS / "bench-w2.toml")
    assert (w2.model.name, w2.model.max_length, w2.adapter.method) == ("bert-w2", 64, "full")
    assert (w2.data.name, w2.data.test_fraction, w2.partition.method) == ("random-tokens", 0.05, "iid")
    assert (w2.federation.clients, w2.federation.clients_per_round, w2.federation.rounds) == (10, 10, 3)


def test_w1_one_round_runs_and_reports_accuracy(tmp_path):
    from fedfm.runner import run

    cfg = load_config(CONFIGS / "bench-w1.toml", ["federation.rounds=1", "runtime.threads=1"])
    summary = run(cfg, tmp_path / "w1")
    assert summary["rounds"] == 1 and summary["total_params"] == 64 * 128 + 128 + 128 * 10 + 10
    assert summary["accuracy"] > summary["initial_accuracy"] + 0.1
