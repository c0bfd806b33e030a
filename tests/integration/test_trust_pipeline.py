"""Privacy, secure aggregation and compression wired into whole runs of the tiny model, checked
against references: dp_accounting's epsilon recomputed independently, the plain weighted mean
(within the fixed-point steps of secure aggregation), byte counts from the payload layout, an
uninterrupted run (bit for bit), and the decoded payloads of the surviving clients.

Tolerances: secure aggregation n fixed-point steps per coordinate plus float32 rounding of the
parameters (2^-22 relative); epsilons 1e-9 relative; everything else exact.
"""

from __future__ import annotations

import dataclasses
import json
import logging

import dp_accounting as dp
import pytest
from conftest import Recorder
import torch

from fedfm.checkpoint import load_client_states, load_state
from fedfm.compression import payload_bytes
from fedfm.experiment import Experiment
from fedfm.pipeline import build_pipeline
from fedfm.privacy import epsilon_after
from fedfm.round import run_round
from fedfm.runner import Callbacks, resume, run
from fedfm.runtime.inprocess import InProcessRuntime
from fedfm.secagg import FixedPoint
from fedfm.tensors import weighted_sum

logging.getLogger("absl").setLevel(logging.ERROR)  # dp_accounting's RDP series warnings
VOLATILE = ("wall_s", "elapsed_s")


def _lines(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _with_pipeline(exp, cfg):
    """exp's round plan with cfg's pipeline (the same model, data and trainer)."""
    pipeline = build_pipeline(cfg)
    runtime = InProcessRuntime(exp.plan.runtime.trainer, pipeline)
    return dataclasses.replace(exp.plan, pipeline=pipeline, runtime=runtime)


# ------------------------------------------------------------------------------------- privacy


def test_central_dp_reports_epsilon_per_round(tmp_path, tiny_cfg):
    cfg = tiny_cfg("federation.rounds=3", 'privacy.mechanism="central"', "privacy.noise_multiplier=1.1",
                   "privacy.clip=0.5", "privacy.delta=1e-6")
    run(cfg, tmp_path / "r")
    lines = _lines(tmp_path / "r")
    assert "epsilon" not in lines[0]  # the initial model spent nothing
    for k, line in enumerate(lines[1:], start=1):
        assert line["delta"] == 1e-6
        assert line["epsilon"] == pytest.approx(epsilon_after(k, 1.1, 2 / 4, 1e-6, "rdp"), rel=1e-9)
        ref = dp.rdp.RdpAccountant().compose(dp.PoissonSampledDpEvent(0.5, dp.GaussianDpEvent(1.1)), k)
        assert line["epsilon"] == pytest.approx(ref.get_epsilon(1e-6), rel=1e-9)
    assert load_state(tmp_path / "r" / "checkpoints")[0].extra["dp_rounds"] == 3


def test_target_epsilon_run_ends_within_the_budget(tmp_path, tiny_cfg):
    cfg = tiny_cfg('privacy.mechanism="central"', "privacy.target_epsilon=4.0")
    run(cfg, tmp_path / "r")
    final = _lines(tmp_path / "r")[-1]
    assert final["round"] == cfg.federation.rounds
    assert 0.999 * 4.0 <= final["epsilon"] <= 4.0  # calibrated to the budget, not far below it


def test_local_dp_reports_the_worst_clients_epsilon(tmp_path, tiny_cfg):
    z = 2.0
    cfg = tiny_cfg("federation.rounds=3", 'privacy.mechanism="local"', f"privacy.noise_multiplier={z}",
                   "privacy.clip=0.1")
    run(cfg, tmp_path / "r")
    counts = [0] * cfg.federation.clients
    for line in _lines(tmp_path / "r")[1:]:
        for c in line["clients"]:
            counts[c] += 1
        ref = dp.rdp.RdpAccountant().compose(dp.GaussianDpEvent(z / 2), max(counts)).get_epsilon(1e-5)
        assert line["epsilon"] == pytest.approx(ref, rel=1e-9)


# ------------------------------------------------------------------------------------- secure aggregation


def test_dpsgd_reports_the_worst_clients_sample_level_epsilon(tmp_path, tiny_cfg):
    cfg = tiny_cfg('privacy.mechanism="dpsgd"', "privacy.clip=1.0", "privacy.noise_multiplier=1.1",
                   'adapter.method="lora"')
    run(cfg, tmp_path / "run")
    lines = _lines(tmp_path / "run")[1:]
    exp_sizes = {c: len(idx) for c, idx in enumerate(Experiment.build(cfg).data.train)}
    steps: dict[int, int] = {}
    from fedfm.round import sample_cohort

    for line in lines:
        for c in sample_cohort(cfg.seed, line["round"], cfg.federation.clients, cfg.federation.clients_per_round):
            steps[c] = steps.get(c, 0) + cfg.client.max_steps
        worst = 0.0
        for c, k in steps.items():  # recomputed with dp_accounting directly
            q = min(1.0, cfg.client.batch_size / exp_sizes[c])
            acc = dp.rdp.RdpAccountant()
            acc.compose(dp.PoissonSampledDpEvent(q, dp.GaussianDpEvent(1.1)), k)
            worst = max(worst, acc.get_epsilon(cfg.privacy.delta))
        assert line["epsilon"] == pytest.approx(worst, rel=1e-9)


def test_dpsgd_target_epsilon_is_met_by_the_smallest_client(tmp_path, tiny_cfg):
    cfg = tiny_cfg('privacy.mechanism="dpsgd"', "privacy.target_epsilon=8.0", 'adapter.method="lora"',
                   "federation.rounds=1")
    run(cfg, tmp_path / "run")
    assert 0 < _lines(tmp_path / "run")[-1]["epsilon"] <= 8.0


def test_secagg_run_equals_the_plain_mean_run(tmp_path, tiny_cfg):
    common = ("federation.rounds=1", "federation.clients_per_round=4", 'adapter.method="lora"',
              'partition.method="dirichlet"', "partition.alpha=0.5")  # unequal client sizes: the weights matter
    plain, secure = tiny_cfg(*common), tiny_cfg(*common, "secagg.enabled=true")
    run(plain, tmp_path / "plain")
    run(secure, tmp_path / "secure")
    a, _ = load_state(tmp_path / "plain" / "checkpoints")
    b, _ = load_state(tmp_path / "secure" / "checkpoints")
    step = FixedPoint.for_summands(secure.secagg.bits, secure.secagg.clip_range, 4).step
    start = Experiment.build(plain).initial_state().params
    moved = 0.0
    for k in a.params:
        tol = 4 * step + 2**-22 * a.params[k].abs()
        assert bool(((a.params[k] - b.params[k]).abs() <= tol).all()), k
        moved = max(moved, float((a.params[k] - start[k]).abs().max()))
    assert moved > 1000 * 4 * step  # the round did move the model, by far more than the tolerance


def test_secagg_with_dropouts_completes_and_averages_the_survivors(tmp_path, tiny_cfg):
    cfg = tiny_cfg("federation.clients_per_round=4", 'adapter.method="lora"', "secagg.enabled=true",
                   "secagg.dropout=0.3")
    run(cfg, tmp_path / "r")
    lines = _lines(tmp_path / "r")
    assert [line["round"] for line in lines] == [0, 1, 2]
    for line in lines[1:]:  # floor(0.3 * 4) = 1 client vanishes after masking every round
        assert len(line["rejected"]) == 1 and "dropped after masking" in line["rejected"][0]["reason"]
    # one round again, checked against the survivors' weighted mean of what they sent
    exp = Experiment.build(cfg)
    rec = Recorder(exp.plan.runtime)
    state = exp.initial_state()
    new, report = run_round(state, dataclasses.replace(exp.plan, runtime=rec))
    out = {r["client"] for r in report.rejected}
    alive = [r for r in rec.results if r.client_id not in out]
    assert len(out) == 1 and len(alive) == 3
    total = sum(r.metrics["num_examples"] for r in alive)
    everyone = sum(r.metrics["num_examples"] for r in rec.results)
    mean = weighted_sum([r.payload for r in alive], [r.metrics["num_examples"] / total for r in alive])
    step = FixedPoint.for_summands(cfg.secagg.bits, cfg.secagg.clip_range, 4).step
    for k in state.params:  # 3 rounding steps over the survivors' weight sum (at least their share of all 4)
        expected = state.params[k] + mean[k]
        tol = 3 * step / (total / everyone) + 2**-22 * expected.abs()
        assert bool(((new.params[k] - expected).abs() <= tol).all()), k


# ------------------------------------------------------------------------------------- compression


def _layout_bytes(pipeline, params) -> int:
    """Bytes of the payload the codec declares for ``params``, serialized (values do not matter)."""
    like = pipeline.compressor.payload_like(params)
    return payload_bytes({k: torch.zeros(m.shape, dtype=m.dtype) for k, m in like.items()})


def test_compression_cuts_bytes_up_by_the_payload_layout_factor(tiny_cfg):
    base = tiny_cfg("federation.rounds=1")
    exp = Experiment.build(base)
    state = exp.initial_state()
    sizes = {}
    for name, extra in (("none", ()), ("topk", ('compression.name="topk"', "compression.fraction=0.01")),
                        ("quantize", ('compression.name="quantize"', "compression.bits=8"))):
        plan = _with_pipeline(exp, tiny_cfg("federation.rounds=1", *extra))
        _, report = run_round(state, plan)
        assert not report.rejected
        per_client = _layout_bytes(plan.pipeline, state.params)
        assert report.bytes_up == base.federation.clients_per_round * per_client  # exactly what travelled
        sizes[name] = report.bytes_up
    # top-k sends 1% of the values plus as many int32 indices: ~50x smaller; 8-bit codes: ~4x
    assert 40 < sizes["none"] / sizes["topk"] < 51
    assert 3.9 < sizes["none"] / sizes["quantize"] < 4.0


def test_malformed_compressed_payload_is_rejected_with_a_reason(tiny_cfg):
    cfg = tiny_cfg("federation.clients_per_round=3", 'compression.name="topk"', "compression.fraction=0.05")
    exp = Experiment.build(cfg)

    class Corrupting(Recorder):
        def run(self, tasks, on_result=None):
            out = super().run(tasks, on_result)
            idx = next(k for k in out[0].payload if k.endswith(".idx"))
            val = next(k for k in out[1].payload if k.endswith(".val"))
            out[0] = dataclasses.replace(out[0], payload={k: v for k, v in out[0].payload.items() if k != idx})
            out[1] = dataclasses.replace(out[1], payload=dict(out[1].payload, **{val: out[1].payload[val][:-1]}))
            return out

    rec = Corrupting(exp.plan.runtime)
    state = exp.initial_state()
    new, report = run_round(state, dataclasses.replace(exp.plan, runtime=rec))
    reasons = {r["client"]: r["reason"] for r in report.rejected}
    first, second, good = rec.results
    assert set(reasons) == {first.client_id, second.client_id}
    assert reasons[first.client_id].startswith("malformed payload: payload names differ (missing [")
    assert reasons[second.client_id].startswith("malformed payload: payload ")
    assert "expected" in reasons[second.client_id]
    # the round went on with the one good update, decoded
    delta = exp.plan.pipeline.compressor.decode(good.payload, state.params)
    assert all(torch.allclose(new.params[k], state.params[k] + delta[k], atol=1e-7) for k in state.params)


# ------------------------------------------------------------------------------------- resume


class Killed(Exception):
    pass


def test_resume_with_error_feedback_and_adaptive_clip_is_bit_exact(tmp_path, tiny_cfg):
    """Everything a round carries over: error-feedback residuals (per client), the adaptive clip
    and the privacy ledger (ServerState.extra), the server optimizer state."""
    cfg = tiny_cfg("federation.rounds=3", 'adapter.method="lora"', "adapter.dropout=0.1",
                   'algorithm.name="fedadam"', 'compression.name="topk"', "compression.fraction=0.05",
                   'privacy.mechanism="central"', "privacy.noise_multiplier=0.1", "privacy.adaptive_clip=true",
                   "privacy.clip=0.05")
    run(cfg, tmp_path / "full")

    def die_after_round_2(line):
        if line["round"] == 2:
            raise Killed

    with pytest.raises(Killed):
        run(cfg, tmp_path / "cut", Callbacks(on_round_end=die_after_round_2))
    a, meta_a = load_state(tmp_path / "full" / "checkpoints")
    cut, _ = load_state(tmp_path / "cut" / "checkpoints")
    assert cut.round == 2 and cut.extra["adaptive_clip"]["clip"] != 0.05
    resume(tmp_path / "cut")
    b, meta_b = load_state(tmp_path / "cut" / "checkpoints")
    assert a.round == b.round == 3 and a.extra == b.extra
    assert all(torch.equal(a.params[k], b.params[k]) for k in a.params)
    assert all(torch.equal(a.opt_state[k], b.opt_state[k]) for k in a.opt_state)
    ra = load_client_states(tmp_path / "full" / "checkpoints", meta_a)
    rb = load_client_states(tmp_path / "cut" / "checkpoints", meta_b)
    assert ra and list(ra) == list(rb)
    assert all(torch.equal(ra[c][k], rb[c][k]) for c in ra for k in ra[c])

    def strip(lines):
        return [{k: v for k, v in line.items() if k not in VOLATILE} for line in lines]

    assert strip(_lines(tmp_path / "full")) == strip(_lines(tmp_path / "cut"))
