"""DP-SGD trainer (Opacus per-example clipping and noise) against the plain trainer and the formulas."""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("opacus")

from fedfm.experiment import build_client_side  # noqa: E402
from fedfm.tensors import sub  # noqa: E402
from fedfm.trainers.dpsgd import DPSGDTrainer  # noqa: E402
from fedfm.types import ClientTask  # noqa: E402


@pytest.fixture(scope="module")
def side():
    from fedfm.config import load_config
    from tests.conftest import TINY

    cfg = load_config(None, TINY + ['adapter.method="lora"', "adapter.dropout=0.0", 'client.optimizer="sgd"',
                                    "client.lr=0.5", "client.batch_size=8", "client.max_steps=2"])
    return build_client_side(cfg)


def _dp(trainer, **kw):
    fields = {f.name: getattr(trainer, f.name) for f in dataclasses.fields(trainer)}
    return DPSGDTrainer(**fields, **kw)


def _task(trainer, seed=3):
    return ClientTask(round=1, client_id=0, params=trainer.handle.get_params(), seed=seed)


def _norm(delta):
    return float(torch.sqrt(sum((v.double() ** 2).sum() for v in delta.values())))


def test_without_noise_and_clipping_equals_plain_sgd(side):
    _, _, _, trainer = side
    task = _task(trainer)
    plain, _ = trainer.train(task)
    private, metrics = _dp(trainer, noise_multiplier=0.0, max_grad_norm=1e9).train(task)
    for k in plain:
        torch.testing.assert_close(private[k], plain[k], rtol=1e-4, atol=1e-6)
    assert 0 < metrics["dp_sample_rate"] <= 1


def test_per_example_clipping_bounds_each_step(side):
    _, _, _, trainer = side
    task, bound, lr = _task(trainer), 1e-3, trainer.cfg.lr
    plain, _ = trainer.train(task)
    private, m = _dp(trainer, noise_multiplier=0.0, max_grad_norm=bound).train(task)
    # each step moves by lr * (mean of clipped per-example grads), whose norm is <= bound
    assert _norm(sub(private, task.params)) <= lr * bound * m["steps"] * (1 + 1e-5)
    assert _norm(sub(plain, task.params)) > 10 * lr * bound * m["steps"]  # clipping really bit


def test_noise_std_matches_z_times_clip_over_batch(side):
    _, _, _, trainer = side
    task, z, bound = _task(trainer), 200.0, 1e-3
    private, m = _dp(trainer, noise_multiplier=z, max_grad_norm=bound).train(task)
    delta = torch.cat([v.flatten().double() for v in sub(private, task.params).values()])
    # SGD: delta = -lr * sum_steps (clipped mean + N(0, (z C / B)^2)); the noise dominates by 200x
    expected = trainer.cfg.lr * z * bound / trainer.cfg.batch_size * m["steps"] ** 0.5
    assert abs(float(delta.std()) / expected - 1) < 0.05
    again, _ = _dp(trainer, noise_multiplier=z, max_grad_norm=bound).train(task)
    assert all(torch.equal(again[k], private[k]) for k in private)  # seeded noise


def test_shared_model_is_left_without_opacus_hooks(side):
    _, handle, tokens, trainer = side
    _dp(trainer, noise_multiplier=1.0, max_grad_norm=1.0).train(_task(trainer))
    batch = tokens.batch(trainer.client_indices[0][:4], __import__("numpy").random.default_rng(0))
    handle.model(**batch).loss.backward()
    trainable = [p for p in handle.model.parameters() if p.requires_grad]
    assert all(getattr(p, "grad_sample", None) is None for p in trainable)
    handle.model.zero_grad(set_to_none=True)
