"""Downlink compression in a run: replicas per client, compressed bytes, resume, refusals."""

from __future__ import annotations

import dataclasses

import pytest
from conftest import Recorder
import torch

from fedfm import wire
from fedfm.compression.downlink import DOWN_BYTES, INITIAL
from fedfm.config import load_config
from fedfm.errors import ConfigError
from fedfm.experiment import Experiment
from fedfm.round import run_round

DOWN = ['adapter.method="lora"', 'compression.downlink.name="quantize"', "compression.downlink.bits=4"]


def test_each_client_trains_from_its_replica_and_pays_the_compressed_bytes(tiny_cfg):
    """The replica is the old one plus the decoded 4-bit message (recomputed here with the codec
    and the round's generator); the client trains from it and its update is measured from it."""
    from fedfm.compression import Quantize
    from fedfm.pipeline import generator

    exp = Experiment.build(tiny_cfg(*DOWN, "federation.rounds=2"))
    rec = Recorder(exp.plan.runtime)
    trainer = exp.plan.runtime.trainer
    trained_by = {}
    inner = trainer.train_many

    def recording(tasks):  # copies: the client's turn turns the trained tensors into the delta in place
        out = inner(tasks)
        for t, (p, _) in zip(tasks, out):
            trained_by[t.client_id] = {k: v.clone() for k, v in p.items()}
        return out

    trainer.train_many = recording
    plan = dataclasses.replace(exp.plan, runtime=rec)
    state = exp.initial_state()
    x0 = {k: v.clone() for k, v in state.params.items()}
    torch.testing.assert_close(exp.replicas[INITIAL], x0, rtol=0, atol=0)
    codec = Quantize(bits=4)
    for rnd in (1, 2):
        before = {k: v.clone() for k, v in state.params.items()}
        old = {c: {k: v.clone() for k, v in (exp.replicas.get(c) or x0).items()}
               for c in range(exp.cfg.federation.clients)}
        rec.sent.clear(), rec.results.clear()
        state, report = run_round(state, plan)
        for task, result in zip(rec.sent, rec.results):
            c = task.client_id
            diff = {k: v - old[c][k] for k, v in before.items()}
            payload, _ = codec.encode(diff, None, generator(exp.cfg.seed, rnd, c, 0xD0))
            got = codec.decode(payload, diff)
            expect = {k: before[k] if v.numel() < codec.min_numel else old[c][k] + got[k] for k, v in diff.items()}
            torch.testing.assert_close(task.params, expect, rtol=0, atol=0)
            torch.testing.assert_close(exp.replicas[c], expect, rtol=0, atol=0)
            assert result.bytes_down == len(wire.encode(payload)) < wire.encoded_size(before) / 4
            # the update is measured from the replica the client trained from, not the global state
            for k, v in trained_by[c].items():
                torch.testing.assert_close(result.update.delta[k] if result.update else result.payload[k],
                                           v - expect[k], rtol=0, atol=0)
            if rnd == 2:  # replicas now lag the global state, so the two differ
                assert any(not torch.equal(expect[k], before[k]) for k in before)
        assert report.bytes_down == sum(r.bytes_down for r in rec.results)


def test_planning_leaves_replicas_alone_and_dropped_clients_receive_nothing(tiny_cfg):
    """With bandwidth in the simulated clock, the round plans every sampled client's transfer
    (the compressed size) before availability drops some: only the clients that train get a
    download, and only their replicas move."""
    exp = Experiment.build(tiny_cfg(*DOWN, "federation.rounds=3", "clients.availability=0.5",
                                    "clients.bandwidth=1e5"))
    rec = Recorder(exp.plan.runtime)
    plan = dataclasses.replace(exp.plan, runtime=rec)
    state = exp.initial_state()
    dropped_any = False
    for _ in range(3):
        keep = {c: {k: v.clone() for k, v in r.items()} for c, r in exp.replicas.items()}
        rec.sent.clear(), rec.results.clear()
        state, report = run_round(state, plan)
        trained = {t.client_id for t in rec.sent}
        dropped_any |= len(trained) < exp.cfg.federation.clients_per_round
        for c, r in keep.items():
            if c not in trained:
                torch.testing.assert_close(exp.replicas[c], r, rtol=0, atol=0)
        assert set(exp.replicas) - {INITIAL} - set(keep) <= trained
        assert report.bytes_down == len(trained) * exp.plan.downlink.nbytes(state.params)
    assert dropped_any


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
