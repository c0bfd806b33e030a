"""Malformed client updates are rejected and logged; the round completes with the rest.

Runtimes hand back each client's payload as it arrived; with no compression configured the payload
is the delta itself, so corrupting it is corrupting the update."""

from __future__ import annotations

import dataclasses

import torch

from fedfm.experiment import Experiment
from fedfm.round import run_round
from fedfm.tensors import weighted_sum


class Corrupting:
    """Replaces the first client's update with NaNs and the second's with a wrong shape; with
    ``more``, also the third's with a wrong dtype and the fourth's with norm ~1e9."""

    def __init__(self, inner, more=False):
        self.inner, self.more = inner, more

    def run(self, tasks, on_result=None):
        out = self.inner.run(tasks, on_result)
        bad_nan = {k: torch.full_like(v, float("nan")) for k, v in out[0].payload.items()}
        first = next(iter(out[1].payload))
        bad_shape = dict(out[1].payload, **{first: torch.zeros(3, 3, 3)})
        out[0] = dataclasses.replace(out[0], payload=bad_nan)
        out[1] = dataclasses.replace(out[1], payload=bad_shape)
        if self.more:
            out[2] = dataclasses.replace(out[2], payload={k: v.double() for k, v in out[2].payload.items()})
            huge = {k: torch.full_like(v, 1e9 / max(1, sum(x.numel() for x in out[3].payload.values())) ** 0.5)
                    for k, v in out[3].payload.items()}
            out[3] = dataclasses.replace(out[3], payload=huge)
        return out


def test_bad_updates_rejected_round_completes(tiny_cfg):
    exp = Experiment.build(tiny_cfg("federation.clients_per_round=4", 'adapter.method="lora"'))
    plan = dataclasses.replace(exp.plan, runtime=Corrupting(exp.plan.runtime))
    captured = []
    inner_run = plan.runtime.inner.run

    def spy(tasks, on_result=None):
        out = inner_run(tasks, on_result)
        captured.extend(out)
        return out

    plan.runtime.inner.run = spy
    state = exp.initial_state()
    new, report = run_round(state, plan)
    reasons = sorted(r["reason"] for r in report.rejected)
    assert len(reasons) == 2
    assert any("NaN" in r for r in reasons) and any("(3, 3, 3)" in r and "expected" in r for r in reasons)
    good = [(r.payload, r.metrics["num_examples"]) for r in captured[2:]]
    total = sum(n for _, n in good)
    expected = weighted_sum([d for d, _ in good], [n / total for _, n in good])
    for k in state.params:
        assert torch.allclose(new.params[k], state.params[k] + expected[k], atol=1e-6)
        assert torch.isfinite(new.params[k]).all()


def test_all_rejected_keeps_params(tiny_cfg):
    exp = Experiment.build(tiny_cfg("federation.clients_per_round=2"))
    plan = dataclasses.replace(exp.plan, runtime=Corrupting(exp.plan.runtime))
    state = exp.initial_state()
    new, report = run_round(state, plan)
    assert len(report.rejected) == 2 and new.round == 1
    assert all(torch.equal(new.params[k], state.params[k]) for k in state.params)


def test_wrong_dtype_and_huge_norm_are_rejected_with_reasons(tiny_cfg):
    exp = Experiment.build(tiny_cfg("federation.clients_per_round=4", 'adapter.method="lora"'))
    plan = dataclasses.replace(exp.plan, runtime=Corrupting(exp.plan.runtime, more=True))
    _, report = run_round(exp.initial_state(), plan)
    reasons = [r["reason"] for r in sorted(report.rejected, key=lambda r: r["client"])]
    assert len(reasons) == 4
    assert any("float64" in r and "expected" in r and "float32" in r for r in reasons)
    assert any("norm 1e+09 exceeds the sanity bound" in r for r in reasons)
