"""The round's streaming mean: each update is folded into the sum as it arrives, and the runtime
keeps the result without its payload. Checked against the batch path (screen + WeightedMean) and
against the formula sum_i w_i delta_i / sum_i w_i written out in float64."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import pytest
import torch

from fedfm import wire
from fedfm.aggregators.mean import WeightedMean
from fedfm.aggregators.base import AGGREGATORS
import fedfm.aggregators.robust  # noqa: F401  (registers the robust rules)
from fedfm.algorithms.fedavg import FedAvg
from fedfm.pipeline import UpdatePipeline
import fedfm.round
from fedfm.round import RoundPlan, run_round, streams
from fedfm.types import ClientResult, ServerState


@dataclass(frozen=True)
class BatchMean(WeightedMean):
    """The same rule, but not the exact type: the round takes its batch path (the reference)."""


class ScriptedRuntime:
    """Hands back prepared payloads in task order, calling ``on_result`` as the real runtimes do
    (``call_back=False``: never calls it, as a runtime that hands results over only at the end)."""

    streams_results = True

    def __init__(self, payloads: dict[int, tuple[dict, float, float]], call_back: bool = True) -> None:
        self.payloads, self.call_back = payloads, call_back
        self.kept: list[ClientResult] = []

    def run(self, tasks, on_result=None):
        out = []
        for t in tasks:
            payload, n, loss = self.payloads[t.client_id]
            r = ClientResult(client_id=t.client_id, update=None, metrics={"train_loss": loss, "num_examples": n},
                             bytes_up=100, bytes_down=100, payload={k: v.clone() for k, v in payload.items()})
            if on_result is not None and self.call_back:
                r = on_result(r) or r
            out.append(r)
        self.kept = out
        return out


class RewritingRuntime(ScriptedRuntime):
    """Changes a result after handing it to ``on_result`` (what a streaming round cannot honour)."""

    def run(self, tasks, on_result=None):
        out = super().run(tasks, on_result)
        return [replace(out[0], metrics={**out[0].metrics, "train_loss": 9.0}), *out[1:]]


@pytest.fixture
def folds(monkeypatch):
    """Counts the updates the streaming mean folds in (proof that a round streamed)."""
    calls = []
    add = fedfm.round.MeanStream.add

    def spy(self, result):
        calls.append(result.client_id)
        return add(self, result)

    monkeypatch.setattr(fedfm.round.MeanStream, "add", spy)
    return calls


@pytest.fixture(autouse=True)
def _stream_small_updates(monkeypatch):
    """These updates are tiny; rounds stream only large ones unless the threshold is lowered."""
    monkeypatch.setattr(fedfm.round, "STREAM_ABOVE", 0)


def _params():
    g = torch.Generator().manual_seed(0)
    return {"a": torch.randn(3, 4, generator=g), "b": torch.randn(5, generator=g)}


def _payloads(params):
    g = torch.Generator().manual_seed(1)
    out = {}
    for c in range(7):
        delta = {k: torch.randn(v.shape, generator=g) * (c + 1) for k, v in params.items()}
        out[c] = (delta, float(3 + 5 * c), 0.1 * c + 0.05)
    out[2][0]["a"][1, 1] = float("nan")  # NaN: rejected
    out[4][0]["b"].mul_(1e8)  # beyond the sanity bound: rejected
    out[5] = ({"a": torch.zeros(4, 3), "b": torch.zeros(5)}, 8.0, 0.3)  # wrong shape: rejected
    return out


def _round(aggregator, payloads, params, runtime=None):
    runtime = runtime or ScriptedRuntime(payloads)
    plan = RoundPlan(algorithm=FedAvg(), aggregator=aggregator, runtime=runtime, num_clients=7,
                     clients_per_round=7, seed=0)
    state = ServerState(round=0, params=params, opt_state={})
    new, report = run_round(state, plan)
    return new, report, runtime, plan


@pytest.mark.parametrize("weighting", ["examples", "uniform"])
@pytest.mark.parametrize("call_back", [True, False])
def test_streaming_mean_equals_the_batch_path_and_the_formula(weighting, call_back, folds):
    params = _params()
    payloads = _payloads(params)
    s_state, s_rep, s_rt, s_plan = _round(WeightedMean(weighting), payloads, params,
                                          ScriptedRuntime(payloads, call_back=call_back))
    assert folds == list(range(7))  # it streamed (without call-backs: every result folded at the end)
    b_state, b_rep, b_rt, b_plan = _round(BatchMean(weighting), payloads, params)
    assert folds == list(range(7))  # the batch path folds nothing
    assert streams(s_plan) and not streams(b_plan)
    # the same updates rejected, for the same reasons, in the same order
    assert [r["client"] for r in s_rep.rejected] == [2, 4, 5]
    assert s_rep.rejected == b_rep.rejected
    assert s_rep.train_loss == pytest.approx(b_rep.train_loss, rel=1e-15)
    # the formula, in float64, over the accepted clients 0, 1, 3, 6
    ok = [0, 1, 3, 6]
    w = {c: (payloads[c][1] if weighting == "examples" else 1.0) for c in ok}
    for k, p in params.items():
        want = p.double() + sum(w[c] * payloads[c][0][k].double() for c in ok) / sum(w.values())
        torch.testing.assert_close(s_state.params[k].double(), want, rtol=2e-7, atol=1e-7)
        # batch and streaming differ at most in float64 rounding, i.e. by at most one float32 ulp
        torch.testing.assert_close(s_state.params[k], b_state.params[k], rtol=1.2e-7, atol=1e-7)
    examples = [payloads[c][1] for c in ok]
    assert s_rep.train_loss == pytest.approx(
        sum(payloads[c][2] * n for c, n in zip(ok, examples)) / sum(examples), rel=1e-12)


def test_a_runtime_that_rewrites_a_folded_result_is_refused():
    params = _params()
    payloads = _payloads(params)
    with pytest.raises(RuntimeError, match="different result for client 0"):
        _round(WeightedMean(), payloads, params, RewritingRuntime(payloads))


def test_a_runtime_that_does_not_declare_streaming_takes_the_batch_path(folds):
    class Plain(ScriptedRuntime):
        streams_results = False

    params = _params()
    payloads = _payloads(params)
    _, report, runtime, _ = _round(WeightedMean(), payloads, params, Plain(payloads))
    assert folds == [] and [r["client"] for r in report.rejected] == [2, 4, 5]


def test_streaming_round_keeps_no_payloads():
    params = _params()
    _, _, runtime, _ = _round(WeightedMean(), _payloads(params), params)
    assert [r.client_id for r in runtime.kept] == list(range(7))
    assert all(r.payload is None and r.update is None for r in runtime.kept)
    # the metrics survive (the progress bar and the cost read them)
    assert all(math.isfinite(r.metrics["train_loss"]) for r in runtime.kept)


def test_streaming_round_with_every_update_rejected_leaves_params():
    params = _params()
    bad = {c: ({k: torch.full_like(v, float("inf")) for k, v in params.items()}, 4.0, 0.2) for c in range(7)}
    new, report, _, _ = _round(WeightedMean(), bad, params)
    assert len(report.rejected) == 7
    assert all(torch.equal(new.params[k], params[k]) for k in params)
    assert math.isnan(report.train_loss)


def test_what_cannot_stream_takes_the_batch_path():
    base = dict(algorithm=FedAvg(), runtime=ScriptedRuntime({}), num_clients=2, clients_per_round=2, seed=0)
    assert streams(RoundPlan(aggregator=WeightedMean(), **base))
    assert not streams(RoundPlan(aggregator=AGGREGATORS.get("median")(), **base))
    assert not streams(RoundPlan(aggregator=WeightedMean(), pipeline=UpdatePipeline(mechanism="central"), **base))
    assert not streams(RoundPlan(aggregator=WeightedMean(), pipeline=UpdatePipeline(mechanism="dpsgd"), **base))
    assert streams(RoundPlan(aggregator=WeightedMean(), pipeline=UpdatePipeline(mechanism="local"), **base))


def test_only_large_cohort_updates_stream(monkeypatch):
    monkeypatch.setattr(fedfm.round, "STREAM_ABOVE", 100)
    plan = RoundPlan(algorithm=FedAvg(), aggregator=WeightedMean(), runtime=ScriptedRuntime({}), num_clients=9,
                     clients_per_round=9, seed=0)
    params = {"a": torch.zeros(5, 4)}  # 20 elements
    assert not streams(plan, params, 5)  # 100 elements: the batch path
    assert streams(plan, params, 6)  # 120
    big = {"a": torch.zeros(100, 4)}
    assert not streams(plan, big, 2) and streams(plan, big, 3)  # one or two clients never stream


def test_in_process_clients_read_the_servers_params_and_may_not_write_them():
    """The in-process broadcast is the server's own tensors (no decoded copy); a trainer that
    writes into them in place is caught by torch's version counters."""
    from fedfm.round import make_tasks
    from fedfm.runtime.inprocess import InProcessRuntime

    class Writer:
        def __init__(self, write):
            self.write, self.seen = write, []

        def train_many(self, tasks):
            out = []
            for t in tasks:
                self.seen.append(t.params)
                if self.write:
                    t.params["b"].add_(1.0)
                out.append(({k: v + 1 for k, v in t.params.items()}, {"train_loss": 0.1, "num_examples": 4.0}))
            return out

    params = _params()
    for write in (False, True):
        trainer = Writer(write)
        runtime = InProcessRuntime(trainer)
        plan = RoundPlan(algorithm=FedAvg(), aggregator=WeightedMean(), runtime=runtime, num_clients=3,
                         clients_per_round=3, seed=0)
        tasks = make_tasks(ServerState(round=0, params=params, opt_state={}), 1, [0, 1, 2], plan)
        if not write:
            results = runtime.run(tasks)
            assert all(p is params for p in trainer.seen)  # no copy of the broadcast
            assert [r.bytes_down for r in results] == [len(wire.encode(params))] * 3
        else:
            with pytest.raises(RuntimeError, match=r"wrote into the broadcast params in place \(b\)"):
                runtime.run(tasks)
