"""Server update rules against scalar hand computations of the papers' formulas."""

from __future__ import annotations

import math

import pytest
import torch

from fedfm.algorithms import build_algorithm
from fedfm.config import AlgorithmConfig

X = [1.0, -2.0, 0.5]
DELTAS = [[0.5, -1.0, 0.0], [0.1, 0.3, -0.2], [-0.4, 0.2, 0.7]]


def _run(name: str, **kw):
    alg = build_algorithm(AlgorithmConfig(name=name, **kw))
    params = {"w": torch.tensor(X, dtype=torch.float64)}
    state = alg.init_state(params)
    for d in DELTAS:
        params, state = alg.server_update(params, state, {"w": torch.tensor(d, dtype=torch.float64)})
    return params["w"].tolist()


def _reference_adaptive(rule: str, lr: float, b1: float, b2: float, tau: float) -> list[float]:
    """Reddi et al. 2021, Algorithm 2, one coordinate at a time in plain Python."""
    out = []
    for i, x in enumerate(X):
        m, v = 0.0, tau**2
        for d in (step[i] for step in DELTAS):
            m = b1 * m + (1 - b1) * d
            if rule == "adagrad":
                v = v + d * d
            elif rule == "adam":
                v = b2 * v + (1 - b2) * d * d
            else:  # yogi
                v = v - (1 - b2) * d * d * math.copysign(1.0, v - d * d) if v != d * d else v
            x = x + lr * m / (math.sqrt(v) + tau)
        out.append(x)
    return out


def test_fedavg_adds_mean_delta():
    assert _run("fedavg") == pytest.approx([X[i] + sum(d[i] for d in DELTAS) for i in range(3)], abs=1e-12)


def test_fedavg_server_lr_scales_step():
    assert _run("fedavg", server_lr=0.5) == pytest.approx(
        [X[i] + 0.5 * sum(d[i] for d in DELTAS) for i in range(3)], abs=1e-12
    )


def test_fedavgm_momentum():
    ref = []
    for i, x in enumerate(X):
        v = 0.0
        for d in DELTAS:
            v = 0.9 * v + d[i]
            x = x + 1.0 * v
        ref.append(x)
    assert _run("fedavgm", momentum=0.9, server_lr=1.0) == pytest.approx(ref, abs=1e-12)


@pytest.mark.parametrize("name,rule", [("fedadagrad", "adagrad"), ("fedadam", "adam"), ("fedyogi", "yogi")])
def test_adaptive_matches_reddi_algorithm_2(name: str, rule: str):
    kw = dict(server_lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    assert _run(name, **kw) == pytest.approx(
        _reference_adaptive(rule, 0.1, 0.9, 0.99, 1e-3), rel=1e-10, abs=1e-12
    )


def test_adaptive_rules_differ():
    kw = dict(server_lr=0.1)
    results = {n: _run(n, **kw) for n in ("fedadagrad", "fedadam", "fedyogi")}
    assert results["fedadagrad"] != results["fedadam"] != results["fedyogi"]


def test_fedprox_regularizer_value_and_gradient():
    alg = build_algorithm(AlgorithmConfig(name="fedprox", mu=0.3))
    anchor = {"w": torch.tensor([1.0, 2.0])}
    w = torch.tensor([1.5, 1.0], requires_grad=True)
    reg = alg.client_regularizer({"w": w}, anchor, alg.client_payload())
    assert float(reg.detach()) == pytest.approx(0.5 * 0.3 * (0.25 + 1.0))
    reg.backward()
    assert w.grad.tolist() == pytest.approx([0.3 * 0.5, 0.3 * -1.0])


def test_fedprox_server_step_is_fedavg():
    assert _run("fedprox", mu=0.1) == pytest.approx(_run("fedavg"), abs=1e-12)


def test_default_server_lr_per_algorithm():
    assert build_algorithm(AlgorithmConfig(name="fedavg")).server_lr == 1.0
    assert build_algorithm(AlgorithmConfig(name="fedadam")).server_lr == pytest.approx(1e-2)
