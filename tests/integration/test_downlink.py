"""Downlink compression in a run: replicas per client, compressed bytes, resume, refusals."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fedfm import wire
from fedfm.compression.downlink import DOWN_BYTES, INITIAL
from fedfm.config import load_config
from fedfm.errors import ConfigError
from fedfm.experiment import Experiment
from fedfm.round import run_round

DOWN = ['adapter.method="lora"', 'compression.downlink.name="quantize"', "compression.downlink.bits=4"]


class Recorder:
    def __init__(self, inner):
        self.inner, self.sent, self.results = inner, [], []

    def run(self, tasks, on_result=None):
        self.sent.extend(tasks)
        out = self.inner.run(tasks, on_result)
        self.results.extend(out)
        return out


def test_each_client_trains_from_its_replica_and_pays_the_compressed_bytes(tiny_cfg):
    exp = Experiment.build(tiny_cfg(*DOWN, "federation.rounds=2"))
    rec = Recorder(exp.plan.runtime)
    plan = dataclasses.replace(exp.plan, runtime=rec)
    state = exp.initial_state()
    x0 = {k: v.clone() for k, v in state.params.items()}
    torch.testing.assert_close(exp.replicas[INITIAL], x0, rtol=0, atol=0)
    for _ in range(2):
        before = {k: v.clone() for k, v in state.params.items()}
        old = {c: dict(exp.replicas.get(c) or x0) for c in range(exp.cfg.federation.clients)}
        rec.sent.clear(), rec.results.clear()
        state, report = run_round(state, plan)
        for task, result in zip(rec.sent, rec.results):
            held = exp.replicas[task.client_id]
            # what the client trained from is the replica the server keeps
            torch.testing.assert_close(task.params, held, rtol=0, atol=0)
            size = exp.plan.downlink.nbytes(before)
            assert task.payload[DOWN_BYTES] == size == result.bytes_down
            # the message itself: encode(global - old replica) has exactly that length
            payload, _ = exp.plan.downlink.codec.encode(
                {k: v - old[task.client_id][k] for k, v in before.items()}, None, torch.Generator())
            assert size == len(wire.encode(payload))
            assert size < wire.encoded_size(before) / 4
            # the replica is the global state up to one 4-bit grid step
            for k, v in before.items():
                gap = (v - old[task.client_id][k]).abs().max()
                assert (held[k] - v).abs().max() <= gap * 2 / 15 + 1e-6, k
        assert report.bytes_down == sum(r.bytes_down for r in rec.results)
    # the server adds the clients' updates (measured from their replicas) to the exact global state
    assert any(not torch.equal(state.params[k], before[k]) for k in before)


def test_resume_with_downlink_equals_an_uninterrupted_run(tiny_cfg, interrupted_equals_full):
    lines = interrupted_equals_full(tiny_cfg(*DOWN, "federation.rounds=3"))
    plain = [l for l in lines if l.get("phase") == "federated"]
    assert plain and all(l["bytes_down"] > 0 for l in plain)


def test_downlink_saves_bytes_against_the_plain_broadcast(tiny_cfg, tmp_path):
    from fedfm.runner import run

    run(tiny_cfg('adapter.method="lora"', "federation.rounds=1"), tmp_path / "plain")
    run(tiny_cfg(*DOWN, "federation.rounds=1"), tmp_path / "down")
    import json

    def down(d):
        return [json.loads(l) for l in (tmp_path / d / "metrics.jsonl").read_text().splitlines()][-1]["bytes_down"]

    assert down("down") < down("plain") / 4


@pytest.mark.parametrize("extra, match", [
    (['runtime.name="flower-sim"'], "runtime.name must be 'inprocess'"),
    (['adapter.aggregation="flora"'], "re-forms what each client holds"),
    (['adapter.aggregation="hetlora"'], "re-forms what each client holds"),
    (['federation.mode="async"'], "synchronous rounds"),
    (['compression.downlink.name="zip"'], "unknown compressor 'zip'"),
    (['compression.downlink.bits=3'], "bits must be one of"),
])
def test_bad_downlink_configs_are_refused(tiny_cfg, extra, match):
    with pytest.raises((ConfigError, ValueError), match=match):
        tiny_cfg(*DOWN, *extra)


def test_workers_give_the_in_process_run_bit_for_bit(tiny_cfg, tmp_path):
    """Forked workers train each client from the replica the server sends it: same model, same bytes."""
    import json

    from fedfm.checkpoint import load_state
    from fedfm.runner import run

    finals, down = {}, {}
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        run(tiny_cfg(*DOWN, "federation.rounds=2", f"runtime.workers={workers}"), out)
        finals[workers] = load_state(out / "checkpoints")[0].params
        down[workers] = [json.loads(l).get("bytes_down") for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert down[1] == down[2]
    for k, v in finals[1].items():
        assert torch.equal(v, finals[2][k]), k
