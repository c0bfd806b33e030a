"""Personalized FL (fedfm.personalization): what stays local, what travels, how it is evaluated."""

from __future__ import annotations

import pytest
import torch

from fedfm.adapters.lora_aggregation import lora_role
from fedfm.errors import ConfigError
from fedfm.evaluate import evaluate
from fedfm.experiment import Experiment
from fedfm.round import run_round

BASE = ["federation.clients=4", "federation.clients_per_round=4", 'adapter.method="lora"',
        'partition.method="dirichlet"', "partition.alpha=0.3", "client.lr=1e-2"]
METHODS = {
    "fedper": ['personalization.method="fedper"'],
    "fedrep": ['personalization.method="fedrep"', "personalization.head_steps=2"],
    "ditto": ['personalization.method="ditto"'],
    "personal-lora": ['personalization.method="personal-lora"'],
    "fedsa": ['adapter.aggregation="fedsa"'],
}


def _rounds(exp, n):
    state, sent = exp.initial_state(), {}
    for _ in range(n):
        state, _ = run_round(state, exp.plan, lambda r: sent.__setitem__(r.client_id, r))
    return state, sent


@pytest.mark.parametrize("method", list(METHODS))
def test_personal_parameters_stay_on_the_client(tiny_cfg, method):
    exp = Experiment.build(tiny_cfg(*BASE, *METHODS[method]))
    pers = exp.personal
    personal = pers.personal_names(exp.handle)
    shared = pers.shared_names(exp.handle)
    assert personal and shared
    if method in ("fedper", "fedrep"):
        assert all("classifier" in n for n in personal)
    if method == "fedsa":
        assert all(lora_role(n) == "B" for n in personal) and any(lora_role(n) == "A" for n in shared)
    if method == "personal-lora":
        assert all(".personal." in n for n in personal) and any(".default." in n for n in shared)
    state, sent = _rounds(exp, 2)
    assert list(state.params) == shared  # the server holds the shared part only
    for c, r in sent.items():
        assert list(r.payload) == shared  # and only that travels
        own = {k[len("personal/"):]: v for k, v in exp.client_states[c].items() if k.startswith("personal/")}
        assert list(own) == personal
        assert any(not torch.equal(own[k], pers.initial[k]) for k in own)  # trained, kept


def _rounds_from(exp, state):
    return run_round(state, exp.plan)


def test_second_round_starts_from_the_clients_own_values(tiny_cfg):
    exp = Experiment.build(tiny_cfg(*BASE, *METHODS["fedper"], "client.max_steps=1"))
    state, _ = _rounds(exp, 1)
    kept = {k: v.clone() for k, v in exp.client_states[0].items()}
    seen = {}
    trainer = exp.plan.runtime.trainer
    original = trainer.personal.values_of
    trainer.personal.values_of = lambda task: seen.setdefault(task.client_id, original(task))
    run_round(state, exp.plan)
    for k, v in seen[0].items():
        assert torch.equal(v, kept["personal/" + k])


def test_fedrep_trains_head_then_body(tiny_cfg):
    exp = Experiment.build(tiny_cfg(*BASE, *METHODS["fedrep"], "client.max_steps=3"))
    results = {}
    run_round(exp.initial_state(), exp.plan, lambda r: results.__setitem__(r.client_id, r))
    for c, r in results.items():  # one epoch of ceil(n / 16) batches for each phase, capped
        per_epoch = -(-len(exp.data.train[c]) // 16)
        # head_steps exactly, then the body's; "steps" counts the shared body's (SCAFFOLD's K, FedNova's a_i)
        assert r.metrics["head_steps"] == 2 and r.metrics["steps"] == min(3, per_epoch)


def test_ditto_personal_model_is_pulled_to_the_global_one(tiny_cfg):
    """With a strong proximal weight the personal model ends near the received global model."""
    def gap(lam):
        exp = Experiment.build(tiny_cfg(*BASE, 'personalization.method="ditto"', f"personalization.lam={lam}",
                                        'client.optimizer="sgd"', "client.lr=0.05", "personalization.personal_steps=30"))
        received, _ = _rounds(exp, 1)  # round 2 starts from this global model
        _rounds_from(exp, received)
        own = {k[len("personal/"):]: v for k, v in exp.client_states[0].items() if k.startswith("personal/")}
        return sum(float(((own[k] - received.params[k]) ** 2).sum()) for k in received.params)

    assert gap(10.0) < 0.3 * gap(0.0)


def test_per_client_evaluation_uses_each_clients_model(tiny_cfg):
    exp = Experiment.build(tiny_cfg(*BASE, *METHODS["fedper"]))
    state, _ = _rounds(exp, 2)
    out = exp.evaluate(state.params)
    assert out["personalized"] is True
    for c in (0, 3):
        own = {k[len("personal/"):]: v for k, v in exp.client_states[c].items() if k.startswith("personal/")}
        exp.handle.set_params({**state.params, **own}, partial=True)
        ref = evaluate(exp.handle, exp.tokens, exp.data.local_test[c], 128)["accuracy"]
        assert out["client_accuracy"][c] == pytest.approx(ref, abs=1e-12)
    sizes = [len(i) for i in exp.data.local_test]
    pooled = sum(a * n for a, n in zip(out["client_accuracy"], sizes)) / sum(sizes)
    assert out["accuracy"] == pytest.approx(pooled, abs=1e-12)


@pytest.mark.parametrize("overrides, match", [
    (['adapter.method="prompt"', 'personalization.method="fedper"'], "head"),
    (['personalization.method="personal-lora"', 'adapter.method="full"'], "lora"),
    (['adapter.aggregation="fedsa"', 'personalization.method="ditto"'], "fedsa"),
    (['personalization.method="ditto"', 'federation.mode="async"', "federation.buffer=2"], "synchronous"),
    (['personalization.method="ditto"', 'task="mlm"'], "classify"),
])
def test_bad_personalization_refused(tiny_cfg, overrides, match):
    with pytest.raises(ConfigError, match=match):
        tiny_cfg(*BASE, *overrides)
