"""LoRA-aware aggregation (fedfm.adapters.lora_aggregation), each method against a reference
computed independently (products, SVDs, hand-built padding) on small random factors."""

from __future__ import annotations

import math

import pytest
import torch

from fedfm.adapters import lora_aggregation as la
from fedfm.errors import ConfigError

torch.set_num_threads(1)

OUT, IN = 7, 9
Q = "base_model.model.bert.encoder.layer.0.attention.self.query"
V = "base_model.model.bert.encoder.layer.0.attention.self.value"
HEAD = "base_model.model.classifier.modules_to_save.default.weight"


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _factors(ranks, dtype=torch.float64, seed=0, out=OUT, inp=IN):
    g = _gen(seed)
    return [la.LoraFactors(torch.randn(r, inp, generator=g, dtype=dtype),
                           torch.randn(out, r, generator=g, dtype=dtype)) for r in ranks]


def _ref_mean_delta(factors, weights, scalings=None):
    """sum_i p_i s_i B_i A_i, by plain products in float64."""
    total = sum(weights)
    scalings = scalings or [1.0] * len(factors)
    return sum((w / total) * s * (f.B.double() @ f.A.double()) for f, w, s in zip(factors, weights, scalings))


def _rel(x, ref):
    return float(torch.linalg.norm(x.double() - ref) / torch.linalg.norm(ref))


def _params(factors_by_module, head=None, tail=".default.weight"):
    p = {}
    for module, f in factors_by_module.items():
        p[f"{module}.lora_A{tail}"] = f.A
        p[f"{module}.lora_B{tail}"] = f.B
    if head is not None:
        p[HEAD] = head
    return p


# ------------------------------------------------------------------ names and grouping


def test_peft_names_pair_into_modules_and_rest():
    fq, fv = _factors([2, 2], seed=1)
    head = torch.randn(2, OUT, dtype=torch.float64)
    params = _params({Q: fq, V: fv}, head)
    assert la.lora_role(f"{Q}.lora_A.default.weight") == "A"
    assert la.lora_role(f"{Q}.lora_B.default.weight") == "B"
    assert la.lora_role(HEAD) is None
    assert la.lora_module(f"{Q}.lora_B.default.weight") == Q
    groups = la.group_lora(params)
    assert list(groups.factors) == [Q, V]
    assert groups.names[Q] == la.LoraNames(a=f"{Q}.lora_A.default.weight", b=f"{Q}.lora_B.default.weight")
    assert torch.equal(groups.factors[Q].A, fq.A) and torch.equal(groups.factors[V].B, fv.B)
    assert list(groups.rest) == [HEAD]
    back = groups.to_params()
    assert list(back) == list(params) and all(back[k] is params[k] for k in params)


def test_names_without_adapter_segment_pair_too():
    f, = _factors([3])
    groups = la.group_lora({"enc.q.lora_A.weight": f.A, "enc.q.lora_B.weight": f.B})
    assert list(groups.factors) == ["enc.q"]


@pytest.mark.parametrize("drop", ["lora_B", "lora_A"])
def test_missing_partner_raises(drop):
    f, = _factors([2])
    params = {k: v for k, v in _params({Q: f}).items() if drop not in k}
    missing = f"{Q}.{drop}.default.weight"
    with pytest.raises(ValueError, match="has no partner") as err:
        la.group_lora(params)
    assert missing in str(err.value)


def test_mismatched_factor_ranks_raise():
    A = torch.randn(2, IN)
    B = torch.randn(OUT, 3)
    with pytest.raises(ValueError, match="ranks 2 != 3"):
        la.group_lora({f"{Q}.lora_A.default.weight": A, f"{Q}.lora_B.default.weight": B})


def test_embedding_lora_refused():
    with pytest.raises(ValueError, match="embedding"):
        la.pair_lora_names(["emb.lora_embedding_A.default", "emb.lora_embedding_B.default"])


def test_registry_holds_the_six_strategies():
    assert la.LORA_AGGREGATIONS.names() == ["fedsa", "ffa", "flexlora", "flora", "hetlora", "naive"]
    assert la.LORA_AGGREGATIONS.kind == "lora aggregation"
    with pytest.raises(ConfigError, match="unknown lora aggregation"):
        la.LORA_AGGREGATIONS.get("fedavg")


def test_weights_validated():
    assert la.normalize_weights(None, 4) == [0.25] * 4
    assert la.normalize_weights([1, 3], 2) == [0.25, 0.75]
    for bad in ([1.0], [-1.0, 2.0], [0.0, 0.0], [float("nan"), 1.0]):
        with pytest.raises(ValueError):
            la.normalize_weights(bad, 2)


# ------------------------------------------------------------------ naive


def test_naive_is_the_weighted_mean_of_each_factor():
    fs = _factors([4, 4, 4], seed=2)
    w = [1.0, 2.0, 5.0]
    agg = la.naive_aggregate(fs, w)
    p = [x / 8 for x in w]
    assert torch.allclose(agg.A, sum(pi * f.A for pi, f in zip(p, fs)), rtol=0, atol=1e-14)
    assert torch.allclose(agg.B, sum(pi * f.B for pi, f in zip(p, fs)), rtol=0, atol=1e-14)


def test_naive_product_is_not_the_mean_update():
    """The documented problem: mean(B) @ mean(A) != mean(B @ A) on random factors."""
    fs = _factors([4, 4, 4], seed=3)
    agg = la.naive_aggregate(fs, None)
    ref = _ref_mean_delta(fs, [1, 1, 1])
    assert _rel(agg.B @ agg.A, ref) > 0.1


def test_naive_refuses_heterogeneous_ranks():
    with pytest.raises(ValueError, match="same LoRA rank"):
        la.naive_aggregate(_factors([2, 4]), None)


def test_naive_keeps_float32():
    fs = _factors([3, 3], dtype=torch.float32)
    agg = la.naive_aggregate(fs, [1, 1])
    assert agg.A.dtype == agg.B.dtype == torch.float32


# ------------------------------------------------------------------ FFA-LoRA


def test_ffa_names():
    assert not la.ffa_trainable(f"{Q}.lora_A.default.weight")
    assert la.ffa_trainable(f"{Q}.lora_B.default.weight")
    assert la.ffa_trainable(HEAD)


def test_ffa_keeps_A_and_reproduces_the_mean_update_exactly():
    fs = _factors([4, 4, 4], seed=4)
    A = fs[0].A
    w = [3.0, 1.0, 2.0]
    agg = la.ffa_aggregate(A, [(None, f.B) for f in fs[:2]] + [(A.clone(), fs[2].B)], w)
    assert torch.equal(agg.A, A)
    ref = _ref_mean_delta([la.LoraFactors(A, f.B) for f in fs], w)
    assert _rel(agg.B @ agg.A, ref) < 1e-13


def test_ffa_refuses_a_changed_A():
    fs = _factors([4, 4], seed=5)
    A = fs[0].A
    moved = A.clone()
    moved[0, 0] += 1e-6
    with pytest.raises(ValueError, match="FFA-LoRA keeps lora_A frozen") as err:
        la.ffa_aggregate(A, [(A, fs[0].B), (moved, fs[1].B)], None, module=Q)
    assert "client 1" in str(err.value) and Q in str(err.value)


def test_ffa_strategy_on_dicts():
    fs = _factors([3, 3], seed=6)
    A = fs[0].A
    head = [torch.randn(2, OUT, dtype=torch.float64, generator=_gen(i)) for i in range(2)]
    glob = _params({Q: la.LoraFactors(A, torch.zeros(OUT, 3, dtype=torch.float64))}, head[0])
    clients = [{k: v for k, v in _params({Q: la.LoraFactors(A, f.B)}, h).items() if la.ffa_trainable(k)}
               for f, h in zip(fs, head)]
    strat = la.LORA_AGGREGATIONS.get("ffa")
    res = strat.aggregate(la.LoraRound(global_params=glob, client_params=clients, weights=[1, 3]))
    assert list(res.params) == list(glob)
    assert torch.equal(res.params[f"{Q}.lora_A.default.weight"], A)
    assert torch.allclose(res.params[f"{Q}.lora_B.default.weight"], 0.25 * fs[0].B + 0.75 * fs[1].B, atol=1e-14)
    assert torch.allclose(res.params[HEAD], 0.25 * head[0] + 0.75 * head[1], atol=1e-14)
    bad = dict(clients[1], **{f"{Q}.lora_A.default.weight": A + 1})
    with pytest.raises(ValueError, match="FFA-LoRA keeps lora_A frozen"):
        strat.aggregate(la.LoraRound(global_params=glob, client_params=[clients[0], bad]))
    assert not strat.trains(f"{Q}.lora_A.default.weight") and not strat.sends(f"{Q}.lora_A.default.weight")


# ------------------------------------------------------------------ FedSA-LoRA


def test_fedsa_names():
    assert la.fedsa_shared(f"{Q}.lora_A.default.weight")
    assert not la.fedsa_shared(f"{Q}.lora_B.default.weight")
    assert la.fedsa_shared(HEAD)


def test_fedsa_shares_mean_A_and_never_outputs_B():
    fs = _factors([3, 3, 3], seed=7)
    w = [2.0, 1.0, 1.0]
    glob = _params({Q: fs[0], V: fs[1]})
    clients = [{k: v for k, v in _params({Q: f, V: f}).items() if la.fedsa_shared(k)} for f in fs]
    strat = la.LORA_AGGREGATIONS.get("fedsa")
    res = strat.aggregate(la.LoraRound(global_params=glob, client_params=clients, weights=w))
    assert not any(la.lora_role(n) == "B" for n in res.params)
    assert list(res.params) == [f"{Q}.lora_A.default.weight", f"{V}.lora_A.default.weight"]
    ref = 0.5 * fs[0].A + 0.25 * fs[1].A + 0.25 * fs[2].A
    assert torch.allclose(res.params[f"{Q}.lora_A.default.weight"], ref, atol=1e-14)
    assert torch.allclose(la.fedsa_aggregate([f.A for f in fs], w), ref, atol=1e-14)
    assert strat.trains(f"{Q}.lora_B.default.weight") and not strat.sends(f"{Q}.lora_B.default.weight")
    leaked = [_params({Q: f, V: f}) for f in fs]
    with pytest.raises(ValueError, match="keeps lora_B on the client"):
        strat.aggregate(la.LoraRound(global_params=glob, client_params=leaked))


# ------------------------------------------------------------------ FLoRA


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_flora_stacked_product_is_the_weighted_sum_of_products(dtype, tol):
    fs = _factors([2, 4, 8], dtype=dtype, seed=8)
    w = [1.0, 2.0, 3.0]
    st = la.flora_stack(fs, w)
    assert st.A.shape == (14, IN) and st.B.shape == (OUT, 14)
    assert st.A.dtype == st.B.dtype == dtype
    assert _rel(st.B.double() @ st.A.double(), _ref_mean_delta(fs, w)) < tol


def test_flora_stack_folds_per_client_scalings():
    fs = _factors([2, 4, 8], seed=9)
    s = [16 / 2, 16 / 4, 16 / 8]
    st = la.flora_stack(fs, [1, 1, 1], s)
    assert _rel(st.B @ st.A, _ref_mean_delta(fs, [1, 1, 1], s)) < 1e-12


def test_flora_merge_adds_exactly_scaling_times_the_product():
    fs = _factors([2, 4, 8], seed=10)
    base = torch.randn(OUT, IN, dtype=torch.float64, generator=_gen(11))
    w = [5.0, 1.0, 2.0]
    merged = la.flora_merge(base, fs, w, scaling=2.0)
    st = la.flora_stack(fs, w)
    assert torch.allclose(merged - base, 2.0 * (st.B @ st.A), rtol=0, atol=1e-12)
    # per-client scalings (heterogeneous ranks: alpha / r_i)
    s = [8.0, 4.0, 2.0]
    merged = la.flora_merge(base, fs, w, scaling=s)
    assert _rel(merged - base, _ref_mean_delta(fs, w, s)) < 1e-12
    # a Conv1D-style (in, out) weight takes the transposed delta
    merged_t = la.flora_merge(base.T.contiguous(), fs, w, scaling=2.0, fan_in_fan_out=True)
    assert torch.allclose(merged_t - base.T, 2.0 * (st.B @ st.A).T, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="fan_in_fan_out"):
        la.flora_merge(base.T.contiguous(), fs, w)


def test_flora_merge_keeps_the_base_dtype():
    fs = _factors([2, 4], dtype=torch.float32, seed=12)
    base = torch.zeros(OUT, IN, dtype=torch.float32)
    merged = la.flora_merge(base, fs, None, 0.5)
    assert merged.dtype == torch.float32
    assert _rel(merged, 0.5 * _ref_mean_delta(fs, [1, 1])) < 1e-6


def test_reinit_is_peft_init_seeded():
    A, B = la.reinit_lora((4, IN), (OUT, 4), _gen(123))
    with torch.random.fork_rng():
        torch.manual_seed(123)  # peft: nn.init.kaiming_uniform_(lora_A.weight, a=sqrt(5)) on the global RNG
        ref = torch.nn.init.kaiming_uniform_(torch.empty(4, IN), a=math.sqrt(5))
    assert torch.equal(A, ref)
    assert torch.count_nonzero(B) == 0 and B.shape == (OUT, 4)
    assert float(A.abs().max()) <= 1 / math.sqrt(IN)
    assert torch.equal(la.reinit_lora((4, IN), (OUT, 4), _gen(123)).A, A)
    assert not torch.equal(la.reinit_lora((4, IN), (OUT, 4), _gen(124)).A, A)
    with pytest.raises(ValueError, match="do not fit"):
        la.reinit_lora((4, IN), (OUT, 3), _gen(0))


def test_flora_strategy_merges_and_reinitializes():
    fs = _factors([2, 4, 8], seed=13)
    glob = _params({Q: la.LoraFactors(torch.zeros(8, IN, dtype=torch.float64), torch.zeros(OUT, 8, dtype=torch.float64))})
    clients = [_params({Q: f}) for f in fs]
    res = la.LORA_AGGREGATIONS.get("flora").aggregate(la.LoraRound(
        global_params=glob, client_params=clients, weights=[1, 1, 2], generator=_gen(5), target_ranks=[2, 8]))
    assert _rel(res.merge_into_base[Q], _ref_mean_delta(fs, [1, 1, 2])) < 1e-12
    A = res.params[f"{Q}.lora_A.default.weight"]
    B = res.params[f"{Q}.lora_B.default.weight"]
    assert A.shape == (8, IN) and torch.count_nonzero(B) == 0
    assert torch.equal(A, la.reinit_lora((8, IN), (OUT, 8), _gen(5), dtype=torch.float64).A)
    assert [d[f"{Q}.lora_A.default.weight"].shape[0] for d in res.client_params] == [2, 8]
    with pytest.raises(ValueError, match="generator"):
        la.LORA_AGGREGATIONS.get("flora").aggregate(la.LoraRound(global_params=glob, client_params=clients))


# ------------------------------------------------------------------ FlexLoRA


def test_flexlora_exact_when_rank_covers_the_mean_delta():
    fs = _factors([1, 2], seed=14)  # rank(mean delta) <= 3
    w = [1.0, 3.0]
    ref = _ref_mean_delta(fs, w)
    assert torch.allclose(la.flexlora_mean_delta(fs, w), ref, rtol=0, atol=1e-13)
    assert int(torch.linalg.matrix_rank(ref)) == 3
    for r, s in [(3, 1.0), (5, 2.0), (min(OUT, IN), 0.5)]:
        A, B = la.flexlora_redistribute(ref, r, scaling=s)
        assert A.shape == (r, IN) and B.shape == (OUT, r)
        assert _rel(s * (B @ A), ref) < 1e-12


def test_flexlora_truncation_error_is_the_eckart_young_optimum():
    fs = _factors([3, 4, 5], seed=15)
    w = [2.0, 1.0, 1.0]
    ref = _ref_mean_delta(fs, w)
    sv = torch.linalg.svdvals(ref)
    outs = la.flexlora_aggregate(fs, [1, 2, 4], w)
    for (A, B), r in zip(outs, [1, 2, 4]):
        err = float(torch.linalg.norm(ref - B @ A))
        assert err == pytest.approx(float(torch.sqrt((sv[r:] ** 2).sum())), rel=1e-10)
        # the stated split: column j of B and row j of A both have norm sqrt(S_j)
        assert torch.allclose(torch.linalg.norm(B, dim=0), sv[:r].sqrt(), rtol=1e-10)
        assert torch.allclose(torch.linalg.norm(A, dim=1), sv[:r].sqrt(), rtol=1e-10)


def test_flexlora_refuses_a_rank_above_the_layer_size():
    fs = _factors([2, 2], seed=16)
    with pytest.raises(ValueError, match="a FlexLoRA rank above the layer's size") as err:
        la.flexlora_aggregate(fs, [OUT + 1], module=Q)
    assert f"(out={OUT}, in={IN})" in str(err.value) and f"rank {OUT + 1}" in str(err.value)
    with pytest.raises(ValueError, match="a FlexLoRA rank above the layer's size"):
        la.flexlora_redistribute(torch.zeros(OUT, IN), OUT + 1)


def test_flexlora_strategy_serves_each_client_its_rank():
    fs = _factors([2, 4], dtype=torch.float32, seed=17)
    glob = _params({Q: _factors([4], dtype=torch.float32, seed=18)[0]})
    clients = [_params({Q: f}) for f in fs]
    res = la.LORA_AGGREGATIONS.get("flexlora").aggregate(
        la.LoraRound(global_params=glob, client_params=clients, weights=[1, 1], scalings=[8.0, 4.0]))
    ref = _ref_mean_delta(fs, [1, 1], [8.0, 4.0])
    assert _rel(res.exact_deltas[Q], ref) < 1e-6
    ranks = [d[f"{Q}.lora_A.default.weight"].shape[0] for d in res.client_params]
    assert ranks == [2, 4]
    sv = torch.linalg.svdvals(ref)  # rank(ref) = 6 > 4: both clients get the Eckart-Young optimum
    for k, (r, s) in enumerate([(2, 8.0), (4, 4.0)]):
        A, B = (res.client_params[k][f"{Q}.lora_{x}.default.weight"] for x in "AB")
        assert A.dtype == B.dtype == torch.float32
        err = float(torch.linalg.norm(ref - s * (B.double() @ A.double())))
        assert err == pytest.approx(float(torch.sqrt((sv[r:] ** 2).sum())), rel=1e-4)
    # the global params: rank 4 (the global rank), scaling 1 as the clients' scalings differ
    gA, gB = (res.params[f"{Q}.lora_{x}.default.weight"] for x in "AB")
    assert gA.shape == (4, IN)
    assert float(torch.linalg.norm(ref - gB.double() @ gA.double())) == pytest.approx(
        float(torch.sqrt((sv[4:] ** 2).sum())), rel=1e-4)


# ------------------------------------------------------------------ HetLoRA


def test_hetlora_pad_then_truncate_round_trips_exactly():
    fs = _factors([2, 4, 8], dtype=torch.float32, seed=19)
    for f in fs:
        P = la.hetlora_pad(f.A, f.B, 8)
        assert P.A.shape == (8, IN) and P.B.shape == (OUT, 8)
        assert torch.count_nonzero(P.A[f.rank:]) == 0 and torch.count_nonzero(P.B[:, f.rank:]) == 0
        assert torch.equal(P.B @ P.A, f.B @ f.A)
        T = la.hetlora_truncate(P.A, P.B, f.rank)
        assert torch.equal(T.A, f.A) and torch.equal(T.B, f.B)
    with pytest.raises(ValueError):
        la.hetlora_pad(fs[2].A, fs[2].B, 4)


def test_hetlora_sparsity_weights_are_proportional_to_frobenius_norms():
    fs = _factors([2, 4, 8], seed=20)
    norms = [float(torch.linalg.norm(f.B @ f.A)) for f in fs]
    ws = la.hetlora_sparsity_weights(fs)
    assert ws == pytest.approx([n / sum(norms) for n in norms], rel=1e-12)
    s = [8.0, 4.0, 2.0]
    ws_s = la.hetlora_sparsity_weights(fs, s)
    assert ws_s == pytest.approx([n * si / sum(n * si for n, si in zip(norms, s)) for n, si in zip(norms, s)], rel=1e-12)
    zero = [la.LoraFactors(f.A, torch.zeros_like(f.B)) for f in fs]
    assert la.hetlora_sparsity_weights(zero) == pytest.approx([1 / 3] * 3)


def test_hetlora_equal_ranks_equal_norms_is_the_plain_mean():
    f1, f2 = _factors([4, 4], seed=21)
    f2 = la.LoraFactors(f2.A, f2.B * (torch.linalg.norm(f1.B @ f1.A) / torch.linalg.norm(f2.B @ f2.A)))
    assert la.hetlora_sparsity_weights([f1, f2]) == pytest.approx([0.5, 0.5], rel=1e-12)
    agg = la.hetlora_aggregate([f1, f2])
    assert torch.allclose(agg.A, (f1.A + f2.A) / 2, rtol=0, atol=1e-13)
    assert torch.allclose(agg.B, (f1.B + f2.B) / 2, rtol=0, atol=1e-13)


def test_hetlora_aggregate_pads_and_weights_heterogeneous_ranks():
    fs = _factors([2, 4, 8], seed=22)
    ws = la.hetlora_sparsity_weights(fs)
    agg = la.hetlora_aggregate(fs)
    refA = torch.zeros(8, IN, dtype=torch.float64)
    refB = torch.zeros(OUT, 8, dtype=torch.float64)
    for f, w in zip(fs, ws):  # hand-built zero padding
        refA[: f.rank] += w * f.A
        refB[:, : f.rank] += w * f.B
    assert torch.allclose(agg.A, refA, rtol=0, atol=1e-13) and torch.allclose(agg.B, refB, rtol=0, atol=1e-13)
    # folded scalings: s_i B_i aggregated, unfolded on the way out
    s = [8.0, 4.0, 2.0]
    aggs = la.hetlora_aggregate(fs, s)
    ws_s = la.hetlora_sparsity_weights(fs, s)
    refB_s = torch.zeros(OUT, 8, dtype=torch.float64)
    for f, w, si in zip(fs, ws_s, s):
        refB_s[:, : f.rank] += w * si * f.B
    assert torch.allclose(aggs.B, refB_s, rtol=0, atol=1e-12)
    out = la.hetlora_truncate(aggs.A, aggs.B, 4, scaling=4.0)
    assert torch.allclose(out.B, refB_s[:, :4] / 4.0, rtol=0, atol=1e-12)


def test_hetlora_prune_drops_exactly_the_tail_when_its_norm_fell():
    f, = _factors([8], seed=23)
    gamma = 0.75  # tail = components 6, 7
    assert la.hetlora_tail_start(8, gamma) == 6
    tail = float(torch.linalg.norm(f.B[:, 6:] @ f.A[6:]))
    assert la.hetlora_tail_norm(f.A, f.B, gamma) == pytest.approx(tail, rel=1e-12)
    A, B, r = la.hetlora_prune(f.A, f.B, gamma, before=tail * 1.01)
    assert r == 6 and torch.equal(A, f.A[:6]) and torch.equal(B, f.B[:, :6])
    A, B, r = la.hetlora_prune(f.A, f.B, gamma, before=tail * 0.99)
    assert r == 8 and torch.equal(A, f.A) and torch.equal(B, f.B)
    # gamma close to 1 prunes one component at a time; min_rank is a floor
    assert la.hetlora_tail_start(8, 0.99) == 7
    assert la.hetlora_prune(f.A[:1], f.B[:, :1], 0.5, before=1e9)[2] == 1
    assert la.hetlora_prune(f.A, f.B, 0.25, before=1e9, min_rank=4)[2] == 4
    with pytest.raises(ValueError, match="gamma"):
        la.hetlora_tail_start(8, 1.0)


def test_hetlora_regularizer_matches_the_tail_norm_and_is_differentiable():
    f, = _factors([8], seed=24)
    A = f.A.clone().requires_grad_()
    B = f.B.clone().requires_grad_()
    reg = la.hetlora_regularizer(A, B, 0.75)
    assert float(reg.detach()) == pytest.approx(la.hetlora_tail_norm(f.A, f.B, 0.75), rel=1e-12)
    reg.backward()
    assert torch.count_nonzero(A.grad[:6]) == 0 and torch.count_nonzero(B.grad[:, :6]) == 0
    assert torch.count_nonzero(A.grad[6:]) > 0
    Z = torch.zeros(8, IN, dtype=torch.float64, requires_grad=True)
    la.hetlora_regularizer(Z, torch.zeros(OUT, 8, dtype=torch.float64), 0.75).backward()
    assert torch.isfinite(Z.grad).all()


def test_hetlora_strategy_serves_truncations():
    fs = _factors([2, 4], seed=25)
    head = [torch.randn(2, OUT, dtype=torch.float64, generator=_gen(30 + i)) for i in range(2)]
    glob = _params({Q: _factors([4], seed=26)[0]}, head[0])
    clients = [_params({Q: f}, h) for f, h in zip(fs, head)]
    res = la.LORA_AGGREGATIONS.get("hetlora").aggregate(
        la.LoraRound(global_params=glob, client_params=clients, weights=[1, 1], target_ranks=[2, 4]))
    agg = la.hetlora_aggregate(fs, rank=4)
    assert torch.equal(res.params[f"{Q}.lora_A.default.weight"], agg.A)
    assert torch.allclose(res.params[HEAD], (head[0] + head[1]) / 2, atol=1e-14)
    d2 = res.client_params[0]
    assert list(d2) == list(glob)
    assert torch.equal(d2[f"{Q}.lora_A.default.weight"], agg.A[:2])
    assert torch.equal(d2[f"{Q}.lora_B.default.weight"], agg.B[:, :2])


def test_naive_strategy_on_dicts_keeps_order_and_dtype():
    fs = _factors([3, 3], dtype=torch.float32, seed=27)
    glob = _params({Q: fs[0]})
    res = la.LORA_AGGREGATIONS.get("naive").aggregate(
        la.LoraRound(global_params=glob, client_params=[_params({Q: f}) for f in fs], weights=[1, 1]))
    assert list(res.params) == list(glob)
    assert all(v.dtype == torch.float32 for v in res.params.values())
    assert torch.allclose(res.params[f"{Q}.lora_B.default.weight"], (fs[0].B + fs[1].B) / 2)


def test_clients_must_agree_on_layer_and_modules():
    a, = _factors([2], seed=28)
    b, = _factors([2], seed=29, inp=IN + 1)
    for fn in (la.flora_stack, la.flexlora_mean_delta, la.hetlora_aggregate):
        with pytest.raises(ValueError, match="agree on|disagree on"):
            fn([a, b])
    glob = _params({Q: a, V: a})
    with pytest.raises(ValueError, match="same modules"):
        la.LORA_AGGREGATIONS.get("naive").aggregate(
            la.LoraRound(global_params=glob, client_params=[_params({Q: a, V: a}), _params({Q: a})]))
