"""Leakage audits against references: the AUC and ROC against scikit-learn, the LiRA Gaussians and
scores against loops and scipy's normal density, per-example statistics against the evaluator and
softmax, membership attacks on a memorising vs an unseen model, iDLG labels against the truth,
PSNR against its formula, image inversion against a random-image baseline, token-set recovery
against the batch's own tokens, and LoRA inversion against a random guess.

Tolerances: float64 scores 1e-12; float32 model losses 1e-5 relative.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedfm.audits import (
    audit_embedding_update,
    audit_image_update,
    audit_lora_update,
    auc,
    bag_scores,
    example_stats,
    fit_gaussians,
    infer_labels,
    lira_attack,
    lira_scores,
    loss_threshold_attack,
    match_order,
    psnr,
    roc_curve,
    score_attack,
    shadow_splits,
)
from fedfm.data.images import ImageTensors
from fedfm.models.handle import ModelHandle


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads only add contention


class Mlp(torch.nn.Module):
    """A small classifier taking ``pixel_values`` like the image models of fedfm."""

    def __init__(self, inputs: int, hidden: int, classes: int, seed: int, act: type = torch.nn.ReLU):
        super().__init__()
        torch.manual_seed(seed)
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(inputs, hidden), act(),
                                       torch.nn.Linear(hidden, classes))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.net(pixel_values)


def random_images(n: int, side: int, classes: int, seed: int) -> ImageTensors:
    g = torch.Generator().manual_seed(seed)
    return ImageTensors(pixels=torch.rand((n, 1, side, side), generator=g) * 2 - 1,
                        labels=torch.randint(classes, (n,), generator=g))


def fit(model: torch.nn.Module, data: ImageTensors, idx: np.ndarray, steps: int = 300) -> torch.nn.Module:
    """Full-batch Adam until the model memorises ``data[idx]`` (random labels: nothing to generalise)."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    batch = data.batch(idx)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(batch["pixel_values"]), batch["labels"]).backward()
        opt.step()
    return model


# --- scoring ----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_and_roc_match_sklearn(seed):
    from sklearn.metrics import roc_auc_score
    from sklearn.metrics import roc_curve as sk_roc

    rng = np.random.default_rng(seed)
    members = np.round(rng.normal(0.3, 1.0, 300), 1)  # rounding makes ties across the groups
    others = np.round(rng.normal(0.0, 1.0, 400), 1)
    y = np.r_[np.ones(300), np.zeros(400)]
    s = np.r_[members, others]
    assert auc(members, others) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    fpr, tpr = roc_curve(members, others)
    sk_fpr, sk_tpr, _ = sk_roc(y, s, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr, atol=1e-12)
    np.testing.assert_allclose(tpr, sk_tpr, atol=1e-12)
    result = score_attack(members, others, fpr=0.05)
    assert result.tpr_at_fpr == pytest.approx(sk_tpr[sk_fpr <= 0.05].max(), abs=1e-12)
    assert result.advantage == pytest.approx((sk_tpr - sk_fpr).max(), abs=1e-12)


def test_auc_extremes():
    assert auc(np.array([2.0, 3.0]), np.array([0.0, 1.0])) == 1.0
    assert auc(np.array([0.0, 1.0]), np.array([2.0, 3.0])) == 0.0
    assert auc(np.full(5, 0.7), np.full(9, 0.7)) == 0.5
    with pytest.raises(ValueError, match="need members and non-members"):
        auc(np.array([]), np.array([1.0]))
    with pytest.raises(ValueError, match="NaN"):
        auc(np.array([np.nan]), np.array([1.0]))


# --- per-example statistics and the loss attack -----------------------------------------------


@pytest.fixture(scope="module")
def population() -> ImageTensors:
    return random_images(300, 4, 4, seed=0)


def test_example_stats_match_softmax(population):
    handle = ModelHandle.wrap(Mlp(16, 32, 4, seed=1), None)
    idx = np.arange(50)
    stats = example_stats(handle, population, idx, batch_size=16)
    with torch.no_grad():  # the same batches of 16: float32 GEMMs may round differently per batch size
        logits = torch.cat([handle.model(population.pixels[i:min(i + 16, 50)]) for i in range(0, 50, 16)]).double()
    p = torch.softmax(logits, -1).gather(1, population.labels[:50, None]).squeeze(1)
    np.testing.assert_allclose(stats.loss, -torch.log(p).numpy(), rtol=1e-10)
    np.testing.assert_allclose(stats.confidence, torch.log(p / (1 - p)).numpy(), rtol=1e-9)


def test_loss_attack_separates_members_of_a_memorising_model(population):
    members, others = np.arange(100), np.arange(100, 200)
    handle = ModelHandle.wrap(fit(Mlp(16, 128, 4, seed=2), population, members), None)
    result = loss_threshold_attack(example_stats(handle, population, members).loss,
                                   example_stats(handle, population, others).loss)
    assert result.auc > 0.8
    assert result.num_members == result.num_nonmembers == 100


def test_loss_attack_is_chance_on_a_model_that_saw_neither(population):
    members, others, unrelated = np.arange(100), np.arange(100, 200), np.arange(200, 300)
    handle = ModelHandle.wrap(fit(Mlp(16, 128, 4, seed=3), population, unrelated), None)
    result = loss_threshold_attack(example_stats(handle, population, members).loss,
                                   example_stats(handle, population, others).loss)
    # Null sd of the AUC with 100 + 100 examples: sqrt(201 / (12 * 100 * 100)) = 0.041.
    assert abs(result.auc - 0.5) < 0.15


# --- LiRA -------------------------------------------------------------------------------------


def test_shadow_splits_are_balanced_and_seeded():
    splits = shadow_splits(50, 6, seed=4)
    assert splits.shape == (6, 50) and (splits.sum(0) == 3).all()
    assert (splits == shadow_splits(50, 6, seed=4)).all() and not (splits == shadow_splits(50, 6, seed=5)).all()
    with pytest.raises(ValueError, match="even number"):
        shadow_splits(50, 3, seed=0)


def test_gaussian_fit_and_scores_match_by_hand():
    from scipy.stats import norm

    rng = np.random.default_rng(0)
    stats, inside = rng.normal(size=(6, 5)), shadow_splits(5, 6, seed=1)
    fitted = fit_gaussians(stats, inside)
    for j in range(5):
        assert fitted.mu_in[j] == pytest.approx(np.mean(stats[inside[:, j], j]), abs=1e-12)
        assert fitted.sd_in[j] == pytest.approx(np.std(stats[inside[:, j], j]), abs=1e-12)
        assert fitted.mu_out[j] == pytest.approx(np.mean(stats[~inside[:, j], j]), abs=1e-12)
        assert fitted.sd_out[j] == pytest.approx(np.std(stats[~inside[:, j], j]), abs=1e-12)
    target = rng.normal(size=5)
    offline = lira_scores(target, fitted)
    np.testing.assert_allclose(offline, (target - fitted.mu_out) / fitted.sd_out, atol=1e-12)
    online = lira_scores(target, fitted, online=True)
    ratio = norm.logpdf(target, fitted.mu_in, fitted.sd_in) - norm.logpdf(target, fitted.mu_out, fitted.sd_out)
    np.testing.assert_allclose(online, ratio, atol=1e-10)


def test_lira_offline_beats_chance(population):
    everyone = np.arange(len(population))
    members = np.random.default_rng(7).permutation(len(population)) < len(population) // 2

    def train_fn(idx: np.ndarray):
        handle = ModelHandle.wrap(fit(Mlp(16, 128, 4, seed=int(idx[:3].sum())), population, idx, steps=150), None)
        return lambda which: example_stats(handle, population, which).confidence

    target = train_fn(everyone[members])(everyone)
    run = lira_attack(train_fn, target, members, num_shadow=4, seed=0, fixed_variance=True)
    assert run.result.auc > 0.6
    assert run.scores.shape == (len(population),) and run.result.num_members == members.sum()


# --- image inversion --------------------------------------------------------------------------


def smooth_images(n: int, side: int, seed: int) -> torch.Tensor:
    """Images in [-1, 1] upsampled from a 4x4 random grid: something with structure to recover."""
    coarse = torch.rand((n, 1, 4, 4), generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return torch.nn.functional.interpolate(coarse, size=(side, side), mode="bilinear", align_corners=True)


def test_psnr_formula_and_order_matching():
    x = smooth_images(5, 8, seed=0)
    assert psnr(x + 0.1, x, data_range=2.0).numpy() == pytest.approx(np.full(5, 10 * math.log10(4 / 0.01)))
    perm = torch.tensor([3, 0, 4, 1, 2])
    recon = x[perm] + 0.01 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(recon[match_order(recon, x)], x, atol=0.05)


@pytest.mark.parametrize("label", [0, 3, 9])
@pytest.mark.parametrize("with_bias", [True, False])
def test_idlg_infers_the_true_label(label, with_bias):
    model = Mlp(64, 32, 10, seed=label, act=torch.nn.Sigmoid)
    loss = torch.nn.functional.cross_entropy(model(smooth_images(1, 8, seed=label)), torch.tensor([label]))
    grads = dict(zip(dict(model.named_parameters()), torch.autograd.grad(loss, list(model.parameters()))))
    if not with_bias:
        grads.pop("net.3.bias")
    assert infer_labels(grads, batch_size=1, num_classes=10) == (label,)


def test_image_inversion_from_an_sgd_update_beats_random_images():
    model = Mlp(64, 64, 10, seed=0, act=torch.nn.Sigmoid)
    handle = ModelHandle.wrap(model, None)
    images, labels = smooth_images(1, 8, seed=1), torch.tensor([7])
    before = handle.get_params()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.nn.functional.cross_entropy(model(images), labels).backward()
    opt.step()
    update = {n: p.detach() - before[n] for n, p in handle.trainable.items()}
    # A first linear layer pins its input down: no image prior needed (the default suits ViTs).
    result = audit_image_update(handle, before, update, images, labels, lr=0.1, iterations=300, tv_weight=1e-4)
    assert result.labels == (7,) and result.label_accuracy == 1.0
    assert result.psnr > result.baseline_psnr + 10
    assert result.reconstruction.shape == images.shape
    assert all(torch.equal(p, before[n]) for n, p in handle.trainable.items())  # left at `before`


# --- text -------------------------------------------------------------------------------------


TEXTS = ["the movie was a quiet triumph", "dull and far too long"]


@pytest.fixture(scope="module")
def bert():
    from fedfm.config import load_config
    from fedfm.experiment import build_model
    from tests.conftest import TINY

    return lambda *extra: build_model(load_config(None, TINY + list(extra)), 2)


def sgd_update(handle: ModelHandle, batch: dict, lr: float = 0.1) -> tuple[dict, dict]:
    """(params before, update) of one eval-mode SGD step on ``batch``."""
    before = handle.get_params()
    handle.model.eval()
    opt = torch.optim.SGD(list(handle.trainable.values()), lr=lr)
    opt.zero_grad(set_to_none=True)
    handle.model(**batch).loss.backward()
    opt.step()
    return before, {n: p.detach() - before[n] for n, p in handle.trainable.items()}


def encode(handle: ModelHandle, texts: list[str]) -> dict:
    enc = handle.tokenizer(texts, padding="longest", return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "labels": torch.arange(len(texts)) % 2}


def test_embedding_rows_reveal_the_exact_token_set(bert):
    handle = bert()
    batch = encode(handle, TEXTS)
    pad, ids, mask = handle.tokenizer.pad_token_id, batch["input_ids"], batch["attention_mask"]
    assert (ids == pad).any()  # the shorter text is padded: padding must not be "recovered"
    _, update = sgd_update(handle, batch)
    result = audit_embedding_update(handle, update, batch)
    special = set(handle.tokenizer.all_special_ids)
    assert set(result.recovered) == set(ids[mask == 1].tolist()) - special
    assert (result.precision, result.recall, result.f1) == (1.0, 1.0, 1.0)
    assert result.baseline_f1 < 0.1
    # Positions too: exactly the rows up to the longest real text change.
    positions = update["bert.embeddings.position_embeddings.weight"].norm(dim=1)
    assert int((positions > 0).sum()) == int(mask.sum(1).max()) and bool((positions[: ids.shape[1]] > 0).all())


def test_example_stats_average_to_the_evaluators_loss(bert):
    from fedfm.data.tokenized import tokenize
    from fedfm.evaluate import evaluate

    handle = bert()
    texts = TEXTS + ["a warm story", "nothing works here at all", "fine"]
    data = tokenize(texts, np.array([1, 0, 1, 0, 1]), handle.tokenizer, max_length=32)
    idx = np.arange(len(texts))
    stats = example_stats(handle, data, idx, batch_size=2)
    reference = evaluate(handle, data, idx, batch_size=3)["loss"]
    assert float(stats.loss.mean()) == pytest.approx(reference, rel=1e-5)


def test_lora_token_inversion_is_seeded_and_beats_a_random_guess(bert):
    handle = bert('adapter.method="lora"')
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():  # a trained adapter: B = 0 at init would hide the A factors' gradients
        for name, p in handle.trainable.items():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    batch = encode(handle, TEXTS[:1])
    before, update = sgd_update(handle, batch)
    with pytest.raises(ValueError, match="do not travel"):
        audit_embedding_update(handle, update, batch)
    first = audit_lora_update(handle, before, update, batch, lr=0.1, iterations=120, seed=0)
    second = audit_lora_update(handle, before, update, batch, lr=0.1, iterations=120, seed=0)
    assert first == second
    for value in (first.precision, first.recall, first.f1, first.baseline_f1, first.accuracy, first.baseline_accuracy):
        assert 0.0 <= value <= 1.0
    assert len(first.recovered) == len(first.true) == 6  # content tokens, no [CLS]/[SEP]
    assert first.accuracy > first.baseline_accuracy and first.f1 > first.baseline_f1


def test_bag_scores_count_repeats():
    assert bag_scores([1, 1, 2], [1, 2, 2]) == pytest.approx((2 / 3, 2 / 3, 2 / 3))
    assert bag_scores([], [1]) == (0.0, 0.0, 0.0)
