"""Heterogeneous LoRA ranks on one shared model (fedfm.adapters.ranks), HetLoRA and FlexLoRA in the round."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fedfm import wire
from fedfm.adapters.lora_aggregation import LORA_AGGREGATIONS, LoraRound, lora_role
from fedfm.adapters.ranks import pad_delta, truncate
from fedfm.errors import ConfigError
from fedfm.experiment import Experiment
from fedfm.round import make_tasks, run_round, sample_cohort
from fedfm.trainers.local import LocalTrainer
from fedfm.trainers.vectorized import VectorizedTrainer

RANKS = ["federation.clients=4", "federation.clients_per_round=4", 'adapter.method="lora"',
         "adapter.rank=[2, 4, 8, 4]", "client.lr=1e-2"]


def _factors(params):
    return {k: v for k, v in params.items() if lora_role(k)}


def test_truncate_then_pad_is_the_zero_padded_update():
    g = torch.Generator().manual_seed(0)
    glob = {"m.lora_A.default.weight": torch.randn(8, 5, generator=g),
            "m.lora_B.default.weight": torch.randn(6, 8, generator=g), "head.weight": torch.randn(3, generator=g)}
    trained = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in glob.items()}
    trained["m.lora_A.default.weight"][3:] = 0
    trained["m.lora_B.default.weight"][:, 3:] = 0
    delta = {k: trained[k] - glob[k] for k in glob}
    sent = truncate(delta, 3)
    assert sent["m.lora_A.default.weight"].shape == (3, 5) and sent["m.lora_B.default.weight"].shape == (6, 3)
    back = pad_delta(sent, glob, 3)
    for k in glob:
        torch.testing.assert_close(glob[k] + back[k], trained[k], rtol=0, atol=1e-6)


def test_lower_rank_client_trains_exactly_its_first_components(tiny_cfg):
    exp = Experiment.build(tiny_cfg(*RANKS))
    state = exp.initial_state()
    # a global model with every component non-zero, as after some rounds
    g = torch.Generator().manual_seed(1)
    params = {k: v + 0.05 * torch.randn(v.shape, generator=g) if lora_role(k) else v for k, v in state.params.items()}
    state = dataclasses.replace(state, params=params)
    tasks = make_tasks(state, 1, [0, 2], exp.plan)
    assert tasks[0].payload["lora_rank"] == 2 and "lora_rank" not in tasks[1].payload  # client 2 has r_max = 8
    (low, m0), (top, m2) = exp.plan.runtime.trainer.train_many(tasks)
    assert m0["steps"] > 0
    for k, v in _factors(low).items():
        tail = v[2:] if lora_role(k) == "A" else v[:, 2:]
        head = v[:2] if lora_role(k) == "A" else v[:, :2]
        assert torch.count_nonzero(tail) == 0, k
        start = params[k][:2] if lora_role(k) == "A" else params[k][:, :2]
        assert not torch.equal(head, start), k  # it trained
    assert all(torch.count_nonzero(v) > 0.9 * v.numel() for v in _factors(top).values())


def test_bytes_follow_each_clients_rank(tiny_cfg):
    exp = Experiment.build(tiny_cfg(*RANKS))
    state = exp.initial_state()
    results = {}
    run_round(state, exp.plan, lambda r: results.__setitem__(r.client_id, r))
    for c, r in [(0, 2), (1, 4), (2, 8), (3, 4)]:
        payload = results[c].payload
        for k, v in payload.items():
            if lora_role(k) == "A":
                assert v.shape[0] == r
            elif lora_role(k) == "B":
                assert v.shape[1] == r
        assert results[c].bytes_up == wire.encoded_size(payload)
        assert results[c].bytes_down == wire.encoded_size(truncate(state.params, r))
    assert results[0].bytes_up < results[1].bytes_up < results[2].bytes_up


@pytest.mark.parametrize("method", ["hetlora", "flexlora", "naive"])
def test_round_applies_the_strategy_to_zero_padded_factors(tiny_cfg, method):
    """The new global params are the strategy's output on each client's zero-padded trained factors."""
    exp = Experiment.build(tiny_cfg(*RANKS, f'adapter.aggregation="{method}"'))
    state = exp.initial_state()
    results = {}
    new, _ = run_round(state, exp.plan, lambda r: results.__setitem__(r.client_id, r))
    cohort = sample_cohort(exp.cfg.seed, 1, 4, 4)
    clients, weights = [], []
    for c in cohort:
        r = exp.plan.pipeline.rank_of(c)
        sent = exp.plan.pipeline.receive(results[c], state.params).update
        clients.append({k: state.params[k] + sent.delta[k] for k in state.params})
        weights.append(sent.weight)
        if r is not None:  # the padded client holds zeros past its rank
            for k, v in _factors(clients[-1]).items():
                assert torch.count_nonzero(v[r:] if lora_role(k) == "A" else v[:, r:]) == 0
    expect = LORA_AGGREGATIONS.get(method).aggregate(LoraRound(state.params, clients, weights)).params
    for k in state.params:
        torch.testing.assert_close(new.params[k], expect[k], rtol=1e-5, atol=1e-6, msg=k)


def test_vectorised_clients_agree_with_heterogeneous_ranks(tiny_cfg):
    exp = Experiment.build(tiny_cfg(*RANKS, "adapter.dropout=0.0"))
    for m in exp.handle.model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    trainer = exp.plan.runtime.trainer
    vec = VectorizedTrainer(**{f.name: getattr(trainer, f.name) for f in dataclasses.fields(LocalTrainer)})
    tasks = make_tasks(exp.initial_state(), 1, [0, 1, 2, 3], exp.plan)
    seq, together = trainer.train_many(tasks), vec.train_many(tasks)
    assert vec.fallback_reason is None
    for (p1, _), (p2, _) in zip(seq, together):
        for k in p1:
            torch.testing.assert_close(p2[k], p1[k], atol=2e-5, rtol=1e-4, msg=k)


@pytest.mark.parametrize("overrides, match", [
    (["adapter.rank=[2, 4]"], "2 ranks but federation.clients=4"),
    (['adapter.rank="tiers"'], "clients.tiers"),
    (['adapter.aggregation="ffa"'], "ffa"),
    (['adapter.aggregation="hetlora"', 'aggregator.name="median"'], "mean"),
    (['adapter.aggregation="flexlora"', "secagg.enabled=true"], "secure aggregation"),
    (['algorithm.name="fednova"'], "not a training step"),
    (['privacy.mechanism="dpsgd"', "privacy.noise_multiplier=1.0"], "DP-SGD"),
    (["adapter.rank=8", 'adapter.aggregation="hetlora"', 'privacy.mechanism="local"', "privacy.noise_multiplier=1.0",
      "privacy.clip=1.0"], "self_prune"),
    (['adapter.aggregation="flora"', "runtime.workers=2"], "workers"),
    (['adapter.aggregation="flora"', 'federation.mode="async"', "federation.buffer=2"], "async"),
    (["adapter.rank=8", 'adapter.aggregation="hetlora"', 'personalization.method="fedper"'], "personal"),
])
def test_bad_rank_settings_refused_at_load(tiny_cfg, overrides, match):
    with pytest.raises(ConfigError, match=match):
        tiny_cfg(*RANKS, *overrides)


def test_flexlora_rank_above_a_layer_is_refused(tiny_cfg):
    # tiny-bert's attention layers are 64 x 64: rank 80 cannot be redistributed by a truncated SVD
    with pytest.raises(ConfigError, match="above the layer's size"):
        Experiment.build(tiny_cfg('adapter.method="lora"', "adapter.rank=80", 'adapter.aggregation="flexlora"'))


def test_tiers_give_ranks_and_speeds(tiny_cfg):
    cfg = tiny_cfg(*RANKS[:3], 'adapter.rank="tiers"', 'clients.speed="tiers"',
                   "clients.tiers=[{share = 0.5, speed = 1.0, rank = 8}, {share = 0.5, speed = 0.25, rank = 2}]")
    exp = Experiment.build(cfg)
    ranks = exp.plan.pipeline.ranks
    speeds = exp.plan.system.profile.speed
    assert sorted(ranks) == [2, 2, 8, 8]
    assert all((r == 8) == (s == 1.0) for r, s in zip(ranks, speeds))


def test_flora_merges_the_exact_weighted_product_into_the_base(tiny_cfg):
    exp = Experiment.build(tiny_cfg(*RANKS, 'adapter.aggregation="flora"'))
    model = exp.handle.model
    state = exp.initial_state()
    modules = sorted({k.rsplit(".lora_A", 1)[0] for k in state.params if lora_role(k) == "A"})
    before = {m: model.get_submodule(m).base_layer.weight.detach().clone() for m in modules}
    results = {}
    new, _ = run_round(state, exp.plan, lambda r: results.__setitem__(r.client_id, r))
    ups = [exp.plan.pipeline.receive(results[c], state.params).update for c in sorted(results)]
    total = sum(u.weight for u in ups)
    s = exp.cfg.adapter.alpha / 8  # peft's scaling at the model's rank
    for m in modules:
        a, b = f"{m}.lora_A.default.weight", f"{m}.lora_B.default.weight"
        expect = sum(u.weight / total * s * (state.params[b] + u.delta[b]).double() @ (state.params[a] + u.delta[a]).double()
                     for u in ups)
        got = model.get_submodule(m).base_layer.weight.double() - before[m].double()
        torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-6)
        assert torch.count_nonzero(new.params[b]) == 0  # fresh factors: B = 0, so the merge is all there is
        torch.testing.assert_close(new.opt_state["flora_merged/" + m].double(), got, rtol=1e-5, atol=1e-6)


def test_flora_resume_restores_the_merged_base(tiny_cfg, interrupted_equals_full):
    interrupted_equals_full(tiny_cfg(*RANKS, 'adapter.aggregation="flora"', "federation.rounds=3"))


def test_hetlora_self_pruning_shrinks_ranks_and_payloads(tiny_cfg):
    """A strong tail regularizer makes clients drop their tail: ranks never grow, each payload has
    the rank its client reports, and the server keeps the reported ranks for the downloads."""
    exp = Experiment.build(tiny_cfg(*RANKS, 'adapter.aggregation="hetlora"', "adapter.prune_gamma=0.5",
                                    "adapter.prune_lam=1.0", "federation.rounds=3"))
    state, history = exp.initial_state(), []
    for _ in range(3):
        sent = {}
        state, _ = run_round(state, exp.plan, lambda r: sent.__setitem__(r.client_id, r))
        for c, r in sent.items():
            rank = int(r.metrics["lora_rank"])
            for k, v in r.payload.items():
                if lora_role(k) == "A":
                    assert v.shape[0] == rank
            kept = exp.client_states[c]["personal/__lora_rank__"]
            assert int(kept) == rank
        history.append(dict(state.extra["lora_ranks"]))
    for before, after in zip(history, history[1:]):
        assert all(after[c] <= before[c] for c in before)
    assert any(history[-1][c] < r0 for c, r0 in zip("0123", [2, 4, 8, 4]))  # someone pruned
    # next round's downloads are at the pruned ranks
    tasks = make_tasks(state, 4, [0, 1, 2, 3], exp.plan)
    for t in tasks:
        r = history[-1][str(t.client_id)]
        assert t.payload.get("lora_rank", 8) == r


def test_hetlora_pruning_resumes_exactly(tiny_cfg, interrupted_equals_full):
    interrupted_equals_full(tiny_cfg(*RANKS, 'adapter.aggregation="hetlora"', "adapter.prune_gamma=0.5",
                                     "adapter.prune_lam=1.0", "federation.rounds=3"))


def test_flora_clients_download_the_stacks_they_missed(tiny_cfg):
    """A client that sat out rounds downloads every stack merged since it last took part (or the
    whole merged delta if smaller); a stack's size follows its cohort's real ranks."""
    from fedfm.round import FLORA_DENSE, FLORA_STACKS, flora_catch_up

    exp = Experiment.build(tiny_cfg(*RANKS, 'adapter.aggregation="flora"', "federation.clients_per_round=2"))
    state = exp.initial_state()
    cohorts = []
    for _ in range(4):
        seen, before = {}, state
        state, _ = run_round(state, exp.plan, lambda r: seen.__setitem__(r.client_id, r))
        for c, r in seen.items():
            rank = exp.plan.pipeline.rank_of(c) or 8
            assert r.bytes_down == wire.encoded_size(truncate(before.params, rank)) + flora_catch_up(before.extra, c)
        cohorts.append(sorted(seen))
    assert any(flora_catch_up(state.extra, c) > 0 for c in range(4))
    stacks = state.extra[FLORA_STACKS]
    assert [r for r, _ in stacks] == [1, 2, 3, 4]
    sizes = {}
    for (rnd, size), cohort in zip(stacks, cohorts):
        total = sum(exp.plan.pipeline.rank_of(c) or 8 for c in cohort)
        sizes.setdefault(total, set()).add(size)
    assert all(len(v) == 1 for v in sizes.values())  # the size depends on the cohort's ranks only
    if len(sizes) > 1:
        small, large = min(sizes), max(sizes)
        assert next(iter(sizes[small])) < next(iter(sizes[large]))
    assert state.extra[FLORA_DENSE] > 0
