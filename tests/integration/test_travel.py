"""Only trainable parameters travel; the frozen base never does."""

from __future__ import annotations

import dataclasses

import pytest
from conftest import Recorder

from fedfm import wire
from fedfm.experiment import Experiment
from fedfm.round import run_round


@pytest.mark.parametrize("method", ["lora", "head", "full"])
def test_only_trainable_travels(tiny_cfg, method):
    exp = Experiment.build(tiny_cfg(f'adapter.method="{method}"', "federation.rounds=1"))
    rec = Recorder(exp.plan.runtime)
    plan = dataclasses.replace(exp.plan, runtime=rec)
    state = exp.initial_state()
    run_round(state, plan)
    trainable = list(exp.handle.trainable)
    frozen = set(exp.handle.frozen_names())
    for task in rec.sent:
        assert list(task.params) == trainable
        assert not frozen & set(task.params)
    for r in rec.results:  # with no compression the payload is the delta
        assert list(r.payload) == trainable
        assert r.bytes_down == len(wire.encode(state.params))
        assert r.bytes_up == len(wire.encode(r.payload))
    total = sum(p.numel() for p in exp.handle.model.parameters())
    sent = sum(v.numel() for v in rec.sent[0].params.values())
    if method == "full":
        assert not frozen and sent == total
    else:
        assert frozen and sent < 0.2 * total
    if method == "head":
        assert all(n.startswith("classifier.") for n in trainable)
    if method == "lora":
        assert all("lora_" in n or "classifier" in n for n in trainable)
        assert any("lora_A" in n for n in trainable)


def test_frozen_base_unchanged_by_training(tiny_cfg):
    import torch

    exp = Experiment.build(tiny_cfg('adapter.method="lora"', "federation.rounds=1"))
    before = {n: p.detach().clone() for n, p in exp.handle.model.named_parameters() if not p.requires_grad}
    run_round(exp.initial_state(), exp.plan)
    after = dict(exp.handle.model.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before)


@pytest.mark.parametrize("method", ["prompt", "ptuning", "prefix"])
def test_prompt_learning_sends_only_the_prompt_model(tiny_cfg, method):
    """Soft prompts, the P-tuning prompt generator and prefixes: only the prompt model and the
    task head travel, and a round of training changes the prompt."""
    exp = Experiment.build(tiny_cfg(f'adapter.method="{method}"', "adapter.virtual_tokens=4", "federation.rounds=1"))
    trainable = list(exp.handle.trainable)
    prompt = [n for n in trainable if "prompt_encoder" in n]
    assert prompt and all("prompt_encoder" in n or "classifier" in n for n in trainable)
    if method == "ptuning":
        assert any("mlp" in n or "lstm" in n for n in prompt)  # a generator network, not a table
    state = exp.initial_state()
    new, report = run_round(state, exp.plan)
    assert report.bytes_up == 2 * len(wire.encode(state.params))  # 2 clients, same names and shapes
    assert any(not bool((new.params[n] == state.params[n]).all()) for n in prompt)
