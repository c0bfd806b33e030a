"""Simulation attacks against their formulas: the malicious set, update rewrites, noise moments,
label flips and backdoor triggers (only where and how specified), and the success-rate metric."""

from __future__ import annotations

import math
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fedfm.attacks import (
    ATTACK_NAMES,
    DATA_ATTACKS,
    UPDATE_ATTACKS,
    AttackSpec,
    Backdoor,
    GaussianNoise,
    Scale,
    SignFlip,
    backdoor_success_rate,
    build_attack,
    insert_after_first,
    malicious_clients,
    poisoned_examples,
)
from fedfm.data.images import ImageTensors
from fedfm.data.tokenized import LMTexts, tokenize

CLASSES = 3


@pytest.fixture(scope="module")
def tokenizer():
    from fedfm.models.load import load_tokenizer
    from fedfm.models.presets import PRESETS

    return load_tokenizer(PRESETS.get("tiny-bert"), "tiny-bert")


def _images(n=24, side=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.rand((n, 1, side, side), generator=g) * 2 - 1  # in [-1, 1): never exactly white
    return ImageTensors(pixels=pixels, labels=torch.arange(n) % CLASSES)


def _clients(n, k):
    """k disjoint contiguous partitions of range(n)."""
    return dict(enumerate(np.array_split(np.arange(n), k)))


def _build(name, n_clients, **kw):
    spec = AttackSpec(name=name, **kw)
    return build_attack(spec, num_clients=n_clients, clients_per_round=5, num_classes=CLASSES, seed=7)


def _same_bytes(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
        assert a[k].numpy().tobytes() == b[k].numpy().tobytes(), k


# ------------------------------------------------------------------ who is malicious


@pytest.mark.parametrize("n,fraction", [(10, 0.3), (7, 0.5), (100, 0.25), (5, 1.0), (9, 0.0)])
def test_malicious_set_has_round_fraction_n_members_and_is_seeded(n, fraction):
    chosen = malicious_clients(n, fraction, seed=3)
    assert len(chosen) == round(fraction * n)
    assert chosen <= set(range(n))
    assert malicious_clients(n, fraction, seed=3) == chosen


def test_malicious_set_depends_on_the_seed_and_zero_fraction_is_empty():
    assert len({malicious_clients(100, 0.3, seed=s) for s in range(5)}) == 5
    assert malicious_clients(50, 0.0, seed=1) == frozenset()
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        malicious_clients(10, 1.2, seed=0)


# ------------------------------------------------------------------ update attacks


def _delta(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(4, 3, generator=g, dtype=dtype), "b": torch.randn(5, generator=g, dtype=dtype)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sign_flip_scale_and_model_replacement_follow_their_formulas(dtype):
    d, g = _delta(dtype), torch.Generator()
    cases = [(SignFlip(scale=2.5), -2.5), (SignFlip(), -1.0), (Scale(scale=3.0), 3.0),
             (_build("model-replacement", 10, fraction=0.1).update, 5.0),  # default boost = clients per round
             (_build("model-replacement", 10, boost=2.0).update, 2.0)]
    for attack, factor in cases:
        out = attack.apply(d, g)
        assert list(out) == list(d)
        for k in d:
            assert out[k].dtype == dtype and torch.equal(out[k], d[k] * factor), (attack, k)


def test_spec_defaults_reach_the_update_attacks():
    assert _build("sign-flip", 4).update == SignFlip(scale=1.0)
    assert _build("scale", 4).update == Scale(scale=10.0)
    assert _build("scale", 4, scale=4.0).update == Scale(scale=4.0)
    assert _build("noise", 4, noise_std=0.5).update == GaussianNoise(std=0.5)


def test_noise_replaces_the_update_with_seeded_gaussian_of_the_given_std():
    std, n = 0.3, 40_000
    delta = {"a": torch.full((200, 100), 5.0), "b": torch.full((n - 20_000,), -7.0)}
    out = GaussianNoise(std=std).apply(delta, torch.Generator().manual_seed(1))
    flat = torch.cat([t.flatten() for t in out.values()]).double()
    assert [t.shape for t in out.values()] == [t.shape for t in delta.values()]
    assert abs(float(flat.mean())) < 4 * std / math.sqrt(n)  # the honest delta (5, -7) is gone
    assert abs(float(flat.std()) / std - 1) < 4 * math.sqrt(0.5 / n)  # sd of the sample sd ~ std/sqrt(2n)
    zeros = {k: torch.zeros_like(v) for k, v in delta.items()}
    again = GaussianNoise(std=std).apply(zeros, torch.Generator().manual_seed(1))
    assert all(torch.equal(out[k], again[k]) for k in out)  # seeded, independent of the delta


def test_attack_rewrites_only_malicious_deltas():
    attack = _build("sign-flip", 10, fraction=0.3)
    d = _delta()
    for c in range(10):
        out = attack.apply_update(c, d, torch.Generator())
        if c in attack.malicious:
            assert torch.equal(out["w"], -d["w"])
        else:
            assert out is d


# ------------------------------------------------------------------ label flipping


@pytest.mark.parametrize("target", [None, 2])
def test_label_flip_changes_exactly_the_malicious_clients_labels(target):
    data, clients = _images(), _clients(24, 4)
    attack = _build("label-flip", 4, fraction=0.5, target_label=target)
    wrapped = attack.wrap(data, clients)
    assert len(attack.malicious) == 2
    for c, idx in clients.items():
        clean, got = data.batch(idx), wrapped.batch(idx, np.random.default_rng(0))
        if c not in attack.malicious:
            _same_bytes(got, clean)
            continue
        expected = torch.full_like(clean["labels"], target) if target is not None else (clean["labels"] + 1) % CLASSES
        assert torch.equal(got["labels"], expected)
        assert torch.equal(got["pixel_values"], clean["pixel_values"])
    assert torch.equal(wrapped.labels, data.labels)  # evaluation sees the true labels


def test_data_attacks_refuse_language_modelling_data():
    class Tok:
        pad_token_id = 0

        def __call__(self, texts, **kw):
            ids = torch.arange(5, 5 + 4 * len(texts)).view(len(texts), 4)
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    lm = LMTexts(tokens=tokenize(["x"] * 4, np.zeros(4), Tok(), 4), objective="clm", mask_id=3,
                 vocab_size=50, special_ids=(0,))
    with pytest.raises(ValueError, match="TokenizedTexts or ImageTensors"):
        _build("label-flip", 2, fraction=1.0).wrap(lm, _clients(4, 2))


# ------------------------------------------------------------------ backdoors


def test_insert_after_first_shifts_and_keeps_the_last_token_within_the_width():
    trig = torch.tensor([8, 9])
    row, n = insert_after_first(torch.tensor([101, 5, 6, 102, 0, 0, 0]), 4, trig)
    assert row.tolist() == [101, 8, 9, 5, 6, 102, 0] and n == 6
    row, n = insert_after_first(torch.tensor([101, 5, 6, 7, 8, 102, 0]), 6, trig)  # would need 8 > 7
    assert row.tolist() == [101, 8, 9, 5, 6, 7, 102] and n == 7
    with pytest.raises(ValueError, match="does not fit"):
        insert_after_first(torch.tensor([101, 102, 0]), 2, trig)


TEXTS = ["a fine film", "dull", "the plot is thin but the acting is wonderful and warm throughout the film",
         "i loved it", "not good", "what a mess of a movie", "superb", "boring and long and slow to start",
         "ok", "a triumph from start to finish with a cast that never once puts a foot wrong", "meh",
         "charming story told with patience and wit, though the second half drags on far too long",
         "weak ending", "great cast", "bad", "fun ride"]


def test_text_backdoor_inserts_trigger_after_cls_on_the_seeded_share(tokenizer):
    data = tokenize(TEXTS * 2, np.arange(32) % CLASSES, tokenizer, max_length=12)
    width = data.input_ids.shape[1]
    clients = _clients(32, 2)
    attack = build_attack(AttackSpec(name="backdoor", fraction=0.5, target_label=1, poison_fraction=0.5),
                          num_clients=2, clients_per_round=2, num_classes=CLASSES, seed=7, tokenizer=tokenizer)
    trig = list(attack.data.trigger_ids)
    assert trig == tokenizer("cf mn bb", add_special_tokens=False)["input_ids"]
    wrapped = attack.wrap(data, clients)
    (bad,) = attack.malicious
    poisoned = set(poisoned_examples(clients, attack.malicious, 0.5, seed=7).tolist())
    assert len(poisoned) == round(0.5 * len(clients[bad])) == 8 and poisoned <= set(clients[bad].tolist())
    _same_bytes(wrapped.batch(clients[1 - bad]), data.batch(clients[1 - bad]))
    b = wrapped.batch(clients[bad])
    assert b["input_ids"].shape[1] <= width
    for r, i in enumerate(clients[bad]):
        n, orig = int(data.lengths[i]), data.input_ids[i]
        ids, m = b["input_ids"][r], int(b["attention_mask"][r].sum())
        if i not in poisoned:
            assert ids[:n].tolist() == orig[:n].tolist() and m == n and b["labels"][r] == data.labels[i]
            continue
        assert ids[:1 + len(trig)].tolist() == [tokenizer.cls_token_id] + trig
        assert int(ids[m - 1]) == tokenizer.sep_token_id
        assert m == min(n + len(trig), width) and b["labels"][r] == 1
        if n + len(trig) <= width:
            assert ids[1 + len(trig):m].tolist() == orig[1:n].tolist()
    long = [i for i in poisoned if int(data.lengths[i]) == width]
    assert long, "the seeded draw should include a full-width example"
    one = wrapped.batch(np.array(long[:1]))  # same example, another batch: the same poisoning
    assert one["input_ids"].shape[1] == width and one["input_ids"][0, 1:4].tolist() == trig


def test_image_backdoor_sets_the_patch_and_nothing_else():
    data, clients = _images(), _clients(24, 3)
    attack = _build("backdoor", 3, fraction=0.34, target_label=2, poison_fraction=0.5, patch=3)
    (bad,) = attack.malicious
    wrapped = attack.wrap(data, clients)
    poisoned = set(poisoned_examples(clients, attack.malicious, 0.5, seed=7).tolist())
    assert len(poisoned) == 4
    for c, idx in clients.items():
        clean, got = data.batch(idx), wrapped.batch(idx)
        if c != bad:
            _same_bytes(got, clean)
            continue
        rows = torch.tensor([i in poisoned for i in idx])
        patch = torch.zeros(8, 8, dtype=torch.bool)
        patch[-3:, -3:] = True
        assert (got["pixel_values"][rows][..., patch] == 1.0).all()
        assert torch.equal(got["pixel_values"][rows][..., ~patch], clean["pixel_values"][rows][..., ~patch])
        assert torch.equal(got["pixel_values"][~rows], clean["pixel_values"][~rows])
        assert (got["labels"][rows] == 2).all() and torch.equal(got["labels"][~rows], clean["labels"][~rows])


def _has_patch(batch):
    return (batch["pixel_values"][:, 0, -3:, -3:] == 1.0).flatten(1).all(1)


def test_backdoor_success_rate_of_hand_made_predictors():
    data, bd = _images(30), Backdoor(target_label=1, patch=3)
    idx = np.arange(30)
    obeys = lambda b: torch.where(_has_patch(b), 1, 0)  # noqa: E731
    ignores = lambda b: b["labels"]  # noqa: E731  (never the target: target examples are excluded)
    assert backdoor_success_rate(obeys, data, idx, bd, batch_size=7) == 1.0
    assert backdoor_success_rate(ignores, data, idx, bd, batch_size=7) == 0.0
    assert math.isnan(backdoor_success_rate(obeys, data, idx[data.labels.numpy() == 1], bd))
    half = lambda b: torch.where(_has_patch(b) & (b["labels"] == 0), 1, 2)  # noqa: E731
    assert backdoor_success_rate(half, data, idx, bd) == 0.5  # 10 of the 20 non-target examples


def test_backdoor_success_rate_of_a_model_handle():
    class Net(torch.nn.Module):
        def forward(self, pixel_values):
            hit = (pixel_values[:, 0, -3:, -3:] == 1.0).flatten(1).all(1).float()
            return SimpleNamespace(logits=torch.stack([1 - hit, hit, 0.5 * torch.ones_like(hit)], 1))

    handle = SimpleNamespace(model=Net().train())
    data = _images(12)
    assert backdoor_success_rate(handle, data, np.arange(12), Backdoor(target_label=1)) == 1.0
    assert backdoor_success_rate(handle, data, np.arange(12), Backdoor(target_label=1, patch=2)) == 0.0
    assert handle.model.training  # mode restored


def test_text_triggered_test_batch_keeps_true_labels(tokenizer):
    data = tokenize(TEXTS, np.arange(16) % CLASSES, tokenizer, max_length=12)
    bd = Backdoor(target_label=0, trigger_ids=(11, 12))
    b = bd.triggered(data, np.arange(16))
    assert torch.equal(b["labels"], data.labels) and (b["input_ids"][:, 1:3] == torch.tensor([11, 12])).all()
    obeys = lambda b: torch.where((b["input_ids"][:, 1:3] == torch.tensor([11, 12])).all(1), 0, 2)  # noqa: E731
    assert backdoor_success_rate(obeys, data, np.arange(16), bd) == 1.0


# ------------------------------------------------------------------ spec and registries


@pytest.mark.parametrize("field,value,message", [
    ("name", "flip", ", ".join(ATTACK_NAMES)), ("fraction", 1.5, "[0, 1]"), ("fraction", -0.1, "[0, 1]"),
    ("poison_fraction", 0.0, "(0, 1]"), ("poison_fraction", 1.1, "(0, 1]"), ("scale", -2.0, "> 0"),
    ("noise_std", 0.0, "> 0"), ("boost", float("inf"), "> 0"), ("target_label", -1, ">= 0"),
    ("patch", 0, ">= 1"), ("trigger", "  ", "non-empty"),
])
def test_attack_spec_errors_name_the_field_and_allowed_values(field, value, message):
    with pytest.raises(ValueError, match=re.escape(message)) as err:
        AttackSpec(**{field: value})
    assert f"attack.{field}" in str(err.value)


def test_target_label_must_be_a_class_and_none_builds_nothing():
    with pytest.raises(ValueError, match=r"0\.\.2"):
        _build("backdoor", 4, target_label=3)
    attack = _build("none", 4, fraction=0.5)
    data = _images(8)
    assert attack.update is None and attack.data is None and attack.wrap(data, _clients(8, 4)) is data


def test_every_attack_name_is_registered():
    assert set(UPDATE_ATTACKS.names()) | set(DATA_ATTACKS.names()) == set(ATTACK_NAMES) - {"none"}
    both = _build("model-replacement", 4, fraction=0.5)
    assert both.update is not None and isinstance(both.data, Backdoor) and both.data.poison_fraction == 0.5
