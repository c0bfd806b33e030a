"""SCAFFOLD and FedNova through the real round loop against slow references from the papers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedfm.aggregators.mean import WeightedMean
from fedfm.algorithms import build_algorithm
from fedfm.algorithms.fednova import normaliser
from fedfm.config import AlgorithmConfig, ClientConfig, load_config
from fedfm.errors import ConfigError
from fedfm.round import RoundPlan, run_round, sample_cohort
from fedfm.runtime.inprocess import InProcessRuntime
from fedfm.types import ModelUpdate, ServerState

DIM, N, LR = 3, 6, 0.05


def _problem(seed: int = 0):
    """Client i minimises 0.5 (w - b_i)^T H_i (w - b_i); H_i diagonal, heterogeneous."""
    rng = np.random.default_rng(seed)
    H = rng.uniform(0.5, 3.0, size=(N, DIM))
    b = rng.normal(0.0, 2.0, size=(N, DIM))
    steps = [1 + (i % 4) for i in range(N)]  # unequal local work: 1..4 steps
    return H, b, steps


class QuadraticTrainer:
    """Local SGD on the client's quadratic, through the algorithm's regularizer (as LocalTrainer)."""

    def __init__(self, algorithm, H, b, steps):
        self.algorithm, self.H, self.b, self.steps = algorithm, H, b, steps

    def train_many(self, tasks):
        out = []
        for t in tasks:
            i = t.client_id
            w = t.params["w"].clone().requires_grad_(True)
            H, b = torch.tensor(self.H[i]), torch.tensor(self.b[i])
            for _ in range(self.steps[i]):
                loss = 0.5 * (H * (w - b) ** 2).sum()
                reg = self.algorithm.client_regularizer({"w": w}, t.params, t.payload)
                if reg is not None:
                    loss = loss + reg
                (g,) = torch.autograd.grad(loss, [w])
                with torch.no_grad():
                    w -= LR * g
            out.append(({"w": w.detach()}, {"train_loss": float(loss.detach()), "steps": float(self.steps[i]),
                                             "num_examples": 1.0}))
        return out


def _run(name: str, rounds: int, cohort: int, uniform: bool = True, seed: int = 0, **alg):
    H, b, steps = _problem()
    algorithm = build_algorithm(AlgorithmConfig(name=name, **alg), ClientConfig(optimizer="sgd", lr=LR), N)
    runtime = InProcessRuntime(QuadraticTrainer(algorithm, H, b, steps))
    plan = RoundPlan(algorithm=algorithm, aggregator=WeightedMean("uniform" if uniform else "examples"),
                     runtime=runtime, num_clients=N, clients_per_round=cohort, seed=seed)
    params = {"w": torch.zeros(DIM, dtype=torch.float64)}
    state = ServerState(round=0, params=params, opt_state=algorithm.init_state(params))
    reports = []
    for _ in range(rounds):
        state, rep = run_round(state, plan)
        reports.append(rep)
    return state, runtime, reports


def _scaffold_reference(rounds: int, cohort: int, seed: int = 0, server_lr: float = 1.0):
    """Karimireddy et al. 2020, Algorithm 1 (option II), written out in numpy."""
    H, b, steps = _problem()
    x, c = np.zeros(DIM), np.zeros(DIM)
    ci = np.zeros((N, DIM))
    for r in range(1, rounds + 1):
        S = sample_cohort(seed, r, N, cohort)
        dys, dcs = [], []
        for i in S:
            y = x.copy()
            for _ in range(steps[i]):
                y = y - LR * (H[i] * (y - b[i]) - ci[i] + c)
            new_ci = ci[i] - c + (x - y) / (steps[i] * LR)
            dys.append(y - x)
            dcs.append(new_ci - ci[i])
            ci[i] = new_ci
        x = x + server_lr * np.mean(dys, axis=0)
        c = c + len(S) / N * np.mean(dcs, axis=0)
    return x, c, ci


@pytest.mark.parametrize("cohort", [N, 3])
def test_scaffold_matches_the_papers_algorithm(cohort):
    state, runtime, _ = _run("scaffold", rounds=12, cohort=cohort)
    x, c, ci = _scaffold_reference(12, cohort)
    np.testing.assert_allclose(state.params["w"].numpy(), x, rtol=0, atol=1e-10)
    np.testing.assert_allclose(state.opt_state["c/w"].numpy(), c, rtol=0, atol=1e-10)
    for i in range(N):  # each client's c_i lives in its runtime's client state
        if i in runtime.client_states:
            np.testing.assert_allclose(runtime.client_states[i]["algo/c/w"].numpy(), ci[i], atol=1e-10)
        else:
            assert not ci[i].any()


def test_scaffold_removes_client_drift_that_fedavg_keeps():
    """With unequal local steps FedAvg settles away from argmin sum_i f_i; SCAFFOLD reaches it."""
    H, b, _ = _problem()
    optimum = (H * b).sum(0) / H.sum(0)
    scaffold, _, _ = _run("scaffold", rounds=300, cohort=N)
    fedavg, _, _ = _run("fedavg", rounds=300, cohort=N)
    err_s = float(np.abs(scaffold.params["w"].numpy() - optimum).max())
    err_f = float(np.abs(fedavg.params["w"].numpy() - optimum).max())
    assert err_s < 1e-8
    assert err_f > 1e-2


def test_scaffold_download_carries_the_control_variate():
    _, _, plain = _run("fedavg", rounds=1, cohort=N)
    _, _, scaff = _run("scaffold", rounds=1, cohort=N)
    # the control variate has the params' names and shapes: the same encoded size again
    assert scaff[0].bytes_down == 2 * plain[0].bytes_down
    assert scaff[0].bytes_up == plain[0].bytes_up


def test_fednova_normaliser_is_the_momentum_series():
    for rho in (0.0, 0.5, 0.9):
        for tau in (1, 3, 10):
            # gradient t of tau contributes (1 - rho^(tau - t)) / (1 - rho) (= 1 when rho = 0)
            brute = sum(sum(rho**s for s in range(tau - t)) for t in range(tau))
            assert normaliser(tau, rho) == pytest.approx(brute, rel=1e-12)


def test_fednova_round_is_tau_eff_times_the_normalised_mean():
    """One round through run_round against sum_i p_i a_eff delta_i / a_i by hand."""
    H, b, steps = _problem()
    state, _, _ = _run("fednova", rounds=1, cohort=N, uniform=False)
    # each client's plain local SGD from 0 (FedNova changes nothing on the client)
    deltas = []
    for i in range(N):
        y = np.zeros(DIM)
        for _ in range(steps[i]):
            y = y - LR * H[i] * (y - b[i])
        deltas.append(y)
    p = np.full(N, 1.0 / N)  # every client reports num_examples 1
    tau_eff = float((p * np.array(steps)).sum())
    expect = tau_eff * sum(p[i] * deltas[i] / steps[i] for i in range(N))
    np.testing.assert_allclose(state.params["w"].numpy(), expect, atol=1e-12)


def test_fednova_with_equal_steps_is_fedavg():
    alg = build_algorithm(AlgorithmConfig(name="fednova"), ClientConfig(optimizer="sgd"), 4)
    ups = [ModelUpdate(delta={"w": torch.tensor([float(i)])}, weight=float(i + 1), num_examples=i + 1) for i in range(3)]
    out, _ = alg.before_aggregate(ups, [{"steps": 5.0}] * 3, {}, 4, uniform=False)
    assert all(torch.equal(o.delta["w"], u.delta["w"]) for o, u in zip(out, ups))


@pytest.mark.parametrize("overrides, match", [
    (['algorithm.name="scaffold"'], "plain SGD"),
    (['algorithm.name="scaffold"', 'client.optimizer="sgd"', "client.momentum=0.9"], "momentum"),
    (['algorithm.name="scaffold"', 'client.optimizer="sgd"', "secagg.enabled=true"], "secure aggregation"),
    (['algorithm.name="fednova"', 'privacy.mechanism="central"', "privacy.noise_multiplier=1.0"], "privacy"),
    (['algorithm.name="scaffold"', 'client.optimizer="sgd"', 'runtime.name="flower-sim"'], "inprocess"),
    (['algorithm.name="scaffold"', 'client.optimizer="sgd"', 'aggregator.name="median"'], "robust"),
])
def test_bad_algorithm_combinations_refused(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_scaffold_client_that_sends_nothing_keeps_its_control_variate():
    """A client whose update is NaN sends nothing; its c_i must not absorb the NaN."""
    H, b, steps = _problem()
    algorithm = build_algorithm(AlgorithmConfig(name="scaffold"), ClientConfig(optimizer="sgd", lr=LR), N)
    trainer = QuadraticTrainer(algorithm, H, b, steps)
    runtime = InProcessRuntime(trainer)
    plan = RoundPlan(algorithm=algorithm, aggregator=WeightedMean("uniform"), runtime=runtime, num_clients=N,
                     clients_per_round=N, seed=0)
    params = {"w": torch.zeros(DIM, dtype=torch.float64)}
    state, _ = run_round(ServerState(round=0, params=params, opt_state=algorithm.init_state(params)), plan)
    kept = runtime.client_states[2]["algo/c/w"].clone()
    trainer.b = b.copy()
    trainer.b[2] = np.nan
    state, report = run_round(state, plan)
    assert [r["client"] for r in report.rejected] == [2]
    assert torch.equal(runtime.client_states[2]["algo/c/w"], kept)
    assert torch.isfinite(state.opt_state["c/w"]).all()


def test_fednova_counts_a_reported_step_count_below_one_as_one():
    alg = build_algorithm(AlgorithmConfig(name="fednova"), ClientConfig(optimizer="sgd"), 2)
    ups = [ModelUpdate(delta={"w": torch.tensor([1.0])}, weight=1.0, num_examples=1) for _ in range(2)]
    out, _ = alg.before_aggregate(ups, [{"steps": 1e-6}, {"steps": 1.0}], {}, 2, uniform=True)
    assert [float(o.delta["w"]) for o in out] == [1.0, 1.0]
