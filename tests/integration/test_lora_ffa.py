"""FFA-LoRA wired through the config (adapter.aggregation = "ffa"): A never trains or travels,
and the aggregated B times the shared A is exactly the mean of the clients' B_i @ A."""

from __future__ import annotations

import pytest
import torch

from fedfm.experiment import Experiment
from fedfm.round import run_round

pytestmark = pytest.mark.usefixtures("one_thread")

LORA = ['adapter.method="lora"', "adapter.rank=4", "client.max_steps=2", "model.max_length=16",
        "data.max_examples=300", "federation.clients_per_round=3", "client.lr=1e-2"]


def _lora_a(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_A." in n}


def test_ffa_freezes_a_and_aggregates_exactly(tiny_cfg):
    exp = Experiment.build(tiny_cfg(*LORA, 'adapter.aggregation="ffa"'))
    naive = Experiment.build(tiny_cfg(*LORA))
    assert not any(".lora_A." in n for n in exp.handle.trainable)
    assert any(".lora_B." in n for n in exp.handle.trainable)
    assert {n for n in naive.handle.trainable if ".lora_A." not in n} == set(exp.handle.trainable)
    a0 = _lora_a(exp.handle.model)
    assert a0 == {} or all(torch.equal(v, _lora_a(naive.handle.model)[k]) for k, v in a0.items())  # same seed

    state = exp.initial_state()
    payloads = []
    state2, report = run_round(state, exp.plan, on_result=lambda r: payloads.append(r))
    assert not report.rejected and len(payloads) == 3
    for k, v in _lora_a(exp.handle.model).items():
        assert torch.equal(v, a0[k]), f"{k} changed"
    # per module: (B_0 + mean_i dB_i) @ A == mean_i ((B_0 + dB_i) @ A), weights = client examples
    weights = torch.tensor([r.metrics["num_examples"] for r in payloads], dtype=torch.float64)
    weights = weights / weights.sum()
    for name in [n for n in exp.handle.trainable if ".lora_B." in n][:4]:
        a = a0[name.replace(".lora_B.", ".lora_A.")].double()
        mean_of_products = sum(w * (state.params[name].double() + r.payload[name].double()) @ a
                               for w, r in zip(weights, payloads))
        torch.testing.assert_close(state2.params[name].double() @ a, mean_of_products, atol=1e-6, rtol=1e-5)


def test_ffa_sends_fewer_bytes_and_needs_lora(tiny_cfg):
    from fedfm.errors import ConfigError

    ffa = Experiment.build(tiny_cfg(*LORA, 'adapter.aggregation="ffa"'))
    naive = Experiment.build(tiny_cfg(*LORA))
    size = lambda e: sum(p.numel() for p in e.handle.trainable.values())  # noqa: E731
    assert size(ffa) < size(naive)
    with pytest.raises(ConfigError, match="adapter.aggregation='ffa' combines LoRA factors"):
        tiny_cfg('adapter.method="full"', 'adapter.aggregation="ffa"')
