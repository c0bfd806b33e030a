"""LoRA-aware federated aggregation: the math, as pure functions and registered strategies.

Why this module exists. peft's LoRA replaces a frozen linear weight W (out x in) by
W + s * B @ A, with A = lora_A.weight (r x in), B = lora_B.weight (out x r) and the scaling
s = alpha / r. What a client learns is the product B_i @ A_i, but FedAvg on the trainable
parameters averages the factors separately, and

    mean_i(B_i) @ mean_i(A_i) = sum_ij p_i p_j B_i A_j  !=  sum_i p_i B_i A_i = mean_i(B_i @ A_i):

the cross terms B_i A_j (i != j) are aggregation noise. The strategies below differ in what
they keep exact:

=========  ==========================================  ===========================  ===========
name       exact about                                  ranks                        paper
=========  ==========================================  ===========================  ===========
naive      the mean of each factor (not the product)    equal                        FedAvg/FedIT
ffa        mean(B_i @ A) (A frozen, only B averaged)    equal                        ICLR 2024
fedsa      mean of the shared A; B_i stays personal     equal                        ICLR 2025
flora      sum_i p_i s_i B_i A_i (stacking, merged)     any                          NeurIPS 2024
flexlora   mean delta; per-client rank by trunc. SVD    any (<= min(out, in))        NeurIPS 2024
hetlora    zero-padded, sparsity-weighted factors       any                          EMNLP 2024
=========  ==========================================  ===========================  ===========

Conventions (all functions):

* Factors are pairs ``(A, B)`` (a :class:`LoraFactors` named tuple, so ``f.A`` / ``f.B`` work)
  with A: (r, in) and B: (out, r), the shapes of peft's ``lora_A.weight`` / ``lora_B.weight``.
  Every function takes and returns them in this (A, B) order.
* ``weights`` are non-negative client weights (example counts, say), normalized here to
  p_i = w_i / sum_j w_j; ``None`` means uniform.
* Arithmetic is done in float64; results are cast back to the dtype of the corresponding
  input (A's dtype for A, B's for B, the base weight's for a merged weight).
* Scaling. peft applies s_i = alpha / r_i, so with heterogeneous ranks two clients with equal
  factors contribute different deltas. The heterogeneous methods take optional per-client
  ``scalings`` and fold them into B (B_i <- s_i B_i) before aggregating, i.e. they aggregate
  the deltas peft really applies; factors handed back to a client of scaling s are unfolded
  (B <- B / s) so that peft's s * B @ A is the intended delta. ``scalings=None`` means the
  factors are taken as they are (s = 1), which is also right whenever every client uses the
  same scaling (e.g. one peft model at the largest rank, with unused components zeroed).
  The equal-rank methods (naive, ffa, fedsa) need no scaling: it is a common factor.
* Parameter names are peft's, e.g.
  ``base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.default.weight``;
  the module of a factor is the prefix before ``.lora_A`` / ``.lora_B``
  (here ``base_model.model.bert.encoder.layer.0.attention.self.query``), which pairs A with B.
  Everything that is not a LoRA factor (task heads, ``modules_to_save`` copies) is "the rest"
  and is aggregated by the weighted mean in every strategy.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping, NamedTuple, Optional, Protocol, Sequence

import torch

from fedfm.registry import Registry

NamedTensors = Mapping[str, torch.Tensor]

__all__ = [
    "LORA_AGGREGATIONS", "LoraAggregation", "LoraFactors", "LoraGroups", "LoraNames", "LoraRound",
    "LoraRoundResult", "ffa_aggregate", "ffa_trainable", "fedsa_aggregate", "fedsa_shared",
    "flexlora_aggregate", "flexlora_mean_delta", "flexlora_redistribute", "flora_delta64", "flora_merge",
    "flora_stack", "group_lora", "hetlora_aggregate", "hetlora_pad", "hetlora_prune",
    "hetlora_regularizer", "hetlora_sparsity_weights", "hetlora_tail_norm", "hetlora_tail_start",
    "hetlora_truncate", "lora_module", "lora_role", "naive_aggregate", "normalize_weights",
    "pair_lora_names", "reinit_lora", "weighted_mean",
]


class LoraFactors(NamedTuple):
    """One LoRA module's factors: A (r x in) = lora_A.weight, B (out x r) = lora_B.weight."""

    A: torch.Tensor
    B: torch.Tensor

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])


# --------------------------------------------------------------------------------------------
# parameter names
# --------------------------------------------------------------------------------------------

_FACTOR = re.compile(r"^(?P<module>.+)\.lora_(?P<role>[AB])(?P<tail>\..+)?$")
_EMBEDDING_FACTOR = re.compile(r"\.lora_embedding_[AB](\.|$)")


def lora_role(name: str) -> Optional[str]:
    """``"A"`` for a lora_A parameter, ``"B"`` for a lora_B one, None for anything else."""
    m = _FACTOR.match(name)
    return m.group("role") if m else None


def lora_module(name: str) -> str:
    """The module a LoRA factor belongs to: the name's prefix before ``.lora_A`` / ``.lora_B``.

    Raises:
        ValueError: ``name`` is not a LoRA factor.
    """
    m = _FACTOR.match(name)
    if m is None:
        raise ValueError(f"{name!r} is not a LoRA factor (no '.lora_A' or '.lora_B' in it)")
    return m.group("module")


def ffa_trainable(name: str) -> bool:
    """FFA-LoRA: whether parameter ``name`` trains (and is sent). lora_A is frozen at its
    initialization, so False for lora_A; lora_B and the rest (heads) train."""
    return lora_role(name) != "A"


def fedsa_shared(name: str) -> bool:
    """FedSA-LoRA: whether parameter ``name`` is sent to and averaged by the server. True for
    lora_A, False for lora_B (it stays in the client's state); the rest (heads) is shared."""
    return lora_role(name) != "B"


@dataclass(frozen=True)
class LoraNames:
    """The parameter names of one LoRA module's factors."""

    a: str
    b: str


def pair_lora_names(names: Iterable[str]) -> tuple[dict[str, LoraNames], list[str]]:
    """Pair lora_A with lora_B names by module, in first-appearance order.

    Returns:
        (module -> LoraNames, the other names in their order).

    Raises:
        ValueError: a factor without its partner, two adapters on one module, or an
            embedding LoRA (``lora_embedding_A``/``_B``, whose layout differs), each named.
    """
    found: dict[str, dict[str, str]] = {}
    tails: dict[str, str] = {}
    rest: list[str] = []
    for name in names:
        if _EMBEDDING_FACTOR.search(name):
            raise ValueError(f"{name!r}: LoRA on an embedding (lora_embedding_A/B, delta = (B @ A).T) "
                             "is not supported by LoRA-aware aggregation; target linear modules only")
        m = _FACTOR.match(name)
        if m is None:
            rest.append(name)
            continue
        module, role, tail = m.group("module"), m.group("role"), m.group("tail") or ""
        slot = found.setdefault(module, {})
        if tails.setdefault(module, tail) != tail or role in slot:
            raise ValueError(f"module {module!r} has more than one LoRA adapter or duplicate factors "
                             f"({name!r}); LoRA-aware aggregation supports one adapter per module")
        slot[role] = name
    pairs: dict[str, LoraNames] = {}
    for module, slot in found.items():
        if "A" not in slot or "B" not in slot:
            have = slot.get("A") or slot["B"]
            missing = "lora_B" if "A" in slot else "lora_A"
            expected = f"{module}.{missing}{tails[module]}"
            raise ValueError(f"LoRA factor {have!r} has no partner: expected {expected!r} "
                             f"({missing} of module {module!r}) among the same parameters")
        pairs[module] = LoraNames(a=slot["A"], b=slot["B"])
    return pairs, rest


@dataclass(frozen=True)
class LoraGroups:
    """A NamedTensors dict split into per-module factors and the rest (see :func:`group_lora`).

    Attributes:
        factors: module -> (A, B).
        names: module -> the two parameter names.
        rest: every other parameter (heads, ...), name -> tensor.
        order: the original names in their order (the wire order), for :meth:`to_params`.
    """

    factors: dict[str, LoraFactors]
    names: dict[str, LoraNames]
    rest: dict[str, torch.Tensor]
    order: tuple[str, ...]

    def to_params(self, factors: Optional[Mapping[str, LoraFactors]] = None,
                  rest: Optional[Mapping[str, torch.Tensor]] = None,
                  drop: Iterable[str] = ()) -> dict[str, torch.Tensor]:
        """A flat name -> tensor dict in the original order, with ``factors`` / ``rest``
        replacing this group's values, omitting the names in ``drop``."""
        factors = self.factors if factors is None else factors
        rest = self.rest if rest is None else rest
        by_name: dict[str, torch.Tensor] = dict(rest)
        for module, nm in self.names.items():
            if module in factors:
                by_name[nm.a], by_name[nm.b] = factors[module].A, factors[module].B
        dropped = set(drop)
        return {n: by_name[n] for n in self.order if n in by_name and n not in dropped}


def group_lora(params: NamedTensors) -> LoraGroups:
    """Group a NamedTensors dict into per-module (A, B) pairs plus the rest.

    Raises:
        ValueError: as :func:`pair_lora_names`, or factors whose shapes do not fit together.
    """
    names, rest = pair_lora_names(params)
    factors = {}
    for module, nm in names.items():
        factors[module] = _check_factors(params[nm.a], params[nm.b], module)
    return LoraGroups(factors=factors, names=names, rest={n: params[n] for n in rest},
                      order=tuple(params))


def _check_factors(A: torch.Tensor, B: torch.Tensor, where: str = "") -> LoraFactors:
    at = f" of module {where!r}" if where else ""
    if A.dim() != 2 or B.dim() != 2:
        raise ValueError(f"LoRA factors{at} must be matrices; got A {tuple(A.shape)}, B {tuple(B.shape)}")
    if A.shape[0] != B.shape[1]:
        raise ValueError(f"LoRA factors{at} do not fit: A is {tuple(A.shape)} (r x in), B is "
                         f"{tuple(B.shape)} (out x r), ranks {A.shape[0]} != {B.shape[1]}")
    return LoraFactors(A, B)


# --------------------------------------------------------------------------------------------
# weights and plain means
# --------------------------------------------------------------------------------------------


def normalize_weights(weights: Optional[Sequence[float]], n: int) -> list[float]:
    """p_i = w_i / sum_j w_j (uniform when ``weights`` is None).

    Raises:
        ValueError: no clients, a length mismatch, a negative or non-finite weight, or a zero total.
    """
    if n < 1:
        raise ValueError("cannot aggregate zero clients")
    if weights is None:
        return [1.0 / n] * n
    ws = [float(w) for w in weights]
    if len(ws) != n:
        raise ValueError(f"{len(ws)} weights for {n} clients")
    if not all(math.isfinite(w) and w >= 0 for w in ws):
        raise ValueError(f"aggregation weights must be finite and non-negative; got {ws}")
    total = sum(ws)
    if total <= 0:
        raise ValueError(f"aggregation weights sum to {total}; need a positive total")
    return [w / total for w in ws]


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float64)


def _scalings(scalings: Optional[Sequence[float]], n: int) -> list[float]:
    if scalings is None:
        return [1.0] * n
    ss = [float(s) for s in scalings]
    if len(ss) != n or not all(math.isfinite(s) and s > 0 for s in ss):
        raise ValueError(f"need {n} positive finite LoRA scalings (alpha / r per client); got {ss}")
    return ss


def weighted_mean(tensors: Sequence[torch.Tensor], weights: Optional[Sequence[float]] = None) -> torch.Tensor:
    """sum_i p_i t_i in float64, returned in the first tensor's dtype.

    Raises:
        ValueError: shapes differ (or as :func:`normalize_weights`).
    """
    ps = normalize_weights(weights, len(tensors))
    shape = tuple(tensors[0].shape)
    for i, t in enumerate(tensors):
        if tuple(t.shape) != shape:
            raise ValueError(f"cannot average: tensor {i} has shape {tuple(t.shape)}, tensor 0 has {shape}")
    acc = torch.zeros(shape, dtype=torch.float64, device=tensors[0].device)
    for t, p in zip(tensors, ps):
        acc += _f64(t) * p
    return acc.to(tensors[0].dtype)


def _equal_ranks(factors: Sequence[LoraFactors], method: str, where: str = "") -> None:
    ranks = [f.A.shape[0] for f in factors]
    if len(set(ranks)) > 1:
        at = f" (module {where!r})" if where else ""
        raise ValueError(f"{method} needs every client at the same LoRA rank; got ranks {ranks}{at}; "
                         "use flora, flexlora or hetlora for heterogeneous ranks")


# --------------------------------------------------------------------------------------------
# naive (FedAvg on factors)
# --------------------------------------------------------------------------------------------


def naive_aggregate(factors: Sequence[tuple[torch.Tensor, torch.Tensor]],
                    weights: Optional[Sequence[float]] = None, *, module: str = "") -> LoraFactors:
    """FedAvg on the factors: (sum_i p_i A_i, sum_i p_i B_i).

    Preserves exactly the weighted mean of each factor, *not* the mean update: the product of
    the means, sum_ij p_i p_j B_i A_j, differs from sum_i p_i B_i A_i by the cross terms.
    Baseline of FedAvg (McMahan et al., 2017) applied to LoRA as in FedIT (Zhang et al.,
    "Towards Building the Federated GPT: Federated Instruction Tuning", ICASSP 2024).

    Raises:
        ValueError: ranks differ.
    """
    fs = [_check_factors(A, B, module) for A, B in factors]
    _equal_ranks(fs, "naive (FedAvg on the factors)", module)
    return LoraFactors(weighted_mean([f.A for f in fs], weights), weighted_mean([f.B for f in fs], weights))


# --------------------------------------------------------------------------------------------
# FFA-LoRA
# --------------------------------------------------------------------------------------------


def ffa_aggregate(global_A: torch.Tensor, factors: Sequence[tuple[Optional[torch.Tensor], torch.Tensor]],
                  weights: Optional[Sequence[float]] = None, *, module: str = "") -> LoraFactors:
    """FFA-LoRA (Sun, Li, Li, Ding: "Improving LoRA in Privacy-preserving Federated Learning",
    ICLR 2024): A stays frozen at its (shared, seeded) initialization and is neither trained nor
    sent; only B trains and is averaged.

    Returns (global_A, sum_i p_i B_i). Because A is common, sum_i p_i (B_i @ A) =
    (sum_i p_i B_i) @ A exactly: the aggregated factors reproduce the mean update with no
    cross terms. A client's A may be None (not sent, the normal case) or a tensor, which must
    then equal ``global_A`` exactly.

    Raises:
        ValueError: a client's A differs from ``global_A`` (it trained, or was altered in
            transit), or ranks/shapes differ.
    """
    Bs = []
    for i, (A_i, B_i) in enumerate(factors):
        _check_factors(global_A, B_i, module)
        if A_i is not None:
            _ffa_check_A(i, A_i, global_A, module)
        Bs.append(B_i)
    return LoraFactors(global_A, weighted_mean(Bs, weights))


def _ffa_check_A(client: int, A_i: torch.Tensor, global_A: torch.Tensor, module: str) -> None:
    """Raise unless client ``client``'s lora_A equals the frozen global one exactly."""
    same_shape = tuple(A_i.shape) == tuple(global_A.shape)
    if same_shape and torch.equal(_f64(A_i), _f64(global_A)):
        return
    at = f" of module {module!r}" if module else ""
    diff = f"max |diff| {float((_f64(A_i) - _f64(global_A)).abs().max()):.3g}" if same_shape else (
        f"shape {tuple(A_i.shape)} instead of {tuple(global_A.shape)}")
    raise ValueError(
        f"FFA-LoRA keeps lora_A frozen at its initialization, but client {client} sent a lora_A{at} that "
        f"differs from the global one ({diff}); lora_A must not train (see ffa_trainable) nor change in transit")


# --------------------------------------------------------------------------------------------
# FedSA-LoRA
# --------------------------------------------------------------------------------------------


def fedsa_aggregate(As: Sequence[torch.Tensor], weights: Optional[Sequence[float]] = None) -> torch.Tensor:
    """FedSA-LoRA (Guo, Zeng, Wang, Fan, Wang, Qu: "Selective Aggregation for Low-Rank Adaptation
    in Federated Learning", ICLR 2025): A matrices (general knowledge) are shared and averaged,
    B matrices (client-specific knowledge) stay with their client and never reach the server.

    Returns sum_i p_i A_i, exactly the weighted mean of the shared factor. Nothing is claimed
    about the product: client i next trains with (B_i, mean A), a personalized model.

    Raises:
        ValueError: shapes differ.
    """
    return weighted_mean(As, weights)


# --------------------------------------------------------------------------------------------
# FLoRA
# --------------------------------------------------------------------------------------------


def flora_stack(factors: Sequence[tuple[torch.Tensor, torch.Tensor]], weights: Optional[Sequence[float]] = None,
                scalings: Optional[Sequence[float]] = None) -> LoraFactors:
    """FLoRA stacking (Wang, Shen, He, Sun, Wang, Lyu, Li: "FLoRA: Federated Fine-Tuning Large
    Language Models with Heterogeneous Low-Rank Adaptations", NeurIPS 2024).

    A = [A_1; ...; A_n] (sum r_i x in), B = [p_1 s_1 B_1, ..., p_n s_n B_n] (out x sum r_i), so
    that B @ A = sum_i p_i s_i B_i A_i exactly (block products, no cross terms), for any ranks.
    The weight p_i (and the scaling s_i, default 1) is put on B. Returns (A, B).

    Raises:
        ValueError: in/out sizes differ between clients (or as :func:`normalize_weights`).
    """
    A, B, fs = _stack64(factors, weights, scalings)
    return LoraFactors(A.to(fs[0].A.dtype), B.to(fs[0].B.dtype))


def _stack64(factors: Sequence[tuple[torch.Tensor, torch.Tensor]], weights: Optional[Sequence[float]],
             scalings: Optional[Sequence[float]]) -> tuple[torch.Tensor, torch.Tensor, list[LoraFactors]]:
    fs = [_check_factors(A, B) for A, B in factors]
    ps = normalize_weights(weights, len(fs))
    ss = _scalings(scalings, len(fs))
    shapes = {(f.A.shape[1], f.B.shape[0]) for f in fs}
    if len(shapes) > 1:
        raise ValueError(f"factors of one layer must agree on (in, out); clients have {sorted(shapes)}")
    A = torch.cat([_f64(f.A) for f in fs], dim=0)
    B = torch.cat([_f64(f.B) * (p * s) for f, p, s in zip(fs, ps, ss)], dim=1)
    return A, B, fs


def flora_delta64(factors: Sequence[tuple[torch.Tensor, torch.Tensor]], weights: Optional[Sequence[float]] = None,
                  scalings: Optional[Sequence[float]] = None) -> torch.Tensor:
    """sum_i p_i s_i B_i @ A_i in float64 (the stacked product, computed without a cast)."""
    A, B, _ = _stack64(factors, weights, scalings)
    return B @ A


def flora_merge(base_weight: torch.Tensor, factors: Sequence[tuple[torch.Tensor, torch.Tensor]],
                weights: Optional[Sequence[float]] = None, scaling: float | Sequence[float] = 1.0, *,
                fan_in_fan_out: bool = False) -> torch.Tensor:
    """FLoRA's server step: W <- W + sum_i p_i s_i B_i @ A_i (the stacked product), then the
    clients restart from fresh factors (:func:`reinit_lora`), so the merged update is never
    re-averaged.

    ``scaling`` is peft's alpha / r, one number for all clients or one per client (with
    heterogeneous ranks, alpha / r_i). ``fan_in_fan_out`` is peft's flag for layers whose
    weight is stored (in, out) (GPT-2's Conv1D): the delta is then transposed. Exact: the
    result differs from W + delta only by float64 rounding, then the cast to W's dtype.

    Raises:
        ValueError: the delta's shape does not match the base weight.
    """
    ss = (list(scaling) if isinstance(scaling, Sequence) else [float(scaling)] * len(factors))
    delta = flora_delta64(factors, weights, ss)
    if fan_in_fan_out:
        delta = delta.T
    if tuple(delta.shape) != tuple(base_weight.shape):
        raise ValueError(f"FLoRA delta has shape {tuple(delta.shape)} but the base weight is "
                         f"{tuple(base_weight.shape)}" + ("" if fan_in_fan_out else " (a Conv1D layer needs fan_in_fan_out=True)"))
    return (_f64(base_weight) + delta).to(base_weight.dtype)


def reinit_lora(shape_A: Sequence[int], shape_B: Sequence[int], generator: torch.Generator,
                dtype: torch.dtype = torch.float32, device: Optional[torch.device | str] = None) -> LoraFactors:
    """Fresh factors as peft initializes them (init_lora_weights=True): A ~ kaiming-uniform with
    a = sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in)), drawn from the seeded ``generator``; B = 0, so
    the fresh adapter's delta is exactly zero. Returns (A, B).

    Raises:
        ValueError: the shapes do not fit (A: (r, in), B: (out, r)) or no generator is given.
    """
    if not isinstance(generator, torch.Generator):
        raise ValueError("reinit_lora needs a seeded torch.Generator, so that re-initialization is reproducible")
    A = torch.empty(tuple(shape_A), dtype=dtype, device=device)
    B = torch.zeros(tuple(shape_B), dtype=dtype, device=device)
    _check_factors(A, B)
    torch.nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
    return LoraFactors(A, B)


# --------------------------------------------------------------------------------------------
# FlexLoRA
# --------------------------------------------------------------------------------------------


def flexlora_mean_delta(factors: Sequence[tuple[torch.Tensor, torch.Tensor]], weights: Optional[Sequence[float]] = None,
                        scalings: Optional[Sequence[float]] = None) -> torch.Tensor:
    """FlexLoRA's aggregate: the exact weighted mean of the full-size deltas,
    sum_i p_i s_i B_i @ A_i (scalings default 1), in the promoted dtype of the factors."""
    fs = [_check_factors(A, B) for A, B in factors]
    dtype = torch.promote_types(fs[0].A.dtype, fs[0].B.dtype)
    return flora_delta64(fs, weights, scalings).to(dtype)


def _flexlora_split(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, rank: int, scaling: float,
                    shape: tuple[int, int], module: str) -> tuple[torch.Tensor, torch.Tensor]:
    out, inp = shape
    if not (isinstance(rank, int) and rank >= 1):
        raise ValueError(f"a FlexLoRA rank must be a positive integer; got {rank!r}")
    if rank > min(out, inp):
        at = f" {module!r}" if module else ""
        raise ValueError(f"a FlexLoRA rank above the layer's size: rank {rank} > min(out, in) = {min(out, inp)} "
                         f"for the layer{at} of shape (out={out}, in={inp})")
    if not (math.isfinite(scaling) and scaling > 0):
        raise ValueError(f"LoRA scaling must be positive and finite; got {scaling}")
    root = torch.sqrt(S[:rank] / scaling)
    return root[:, None] * Vh[:rank], U[:, :rank] * root[None, :]


def flexlora_redistribute(delta: torch.Tensor, rank: int, scaling: float = 1.0, *, module: str = "",
                          dtype: Optional[torch.dtype] = None) -> LoraFactors:
    """FlexLoRA's redistribution: rank-``rank`` factors of ``delta`` by truncated SVD.

    With delta = U diag(S) V^T, the split is symmetric: B = U[:, :r] * sqrt(S[:r] / s),
    A = sqrt(S[:r] / s)[:, None] * V^T[:r], so that column j of B and row j of A both have norm
    sqrt(S_j / s) and s * B @ A is the best rank-r approximation of delta (Eckart-Young): exact
    when r >= rank(delta), otherwise off by sqrt(sum_{j>r} S_j^2) in Frobenius norm. ``s`` is
    the peft scaling of the receiving client (alpha / r). Returns (A, B) in ``dtype``
    (default: delta's).

    Raises:
        ValueError: r > min(out, in) ("a FlexLoRA rank above the layer's size"), r < 1.
    """
    if delta.dim() != 2:
        raise ValueError(f"a FlexLoRA delta must be a matrix; got shape {tuple(delta.shape)}")
    U, S, Vh = torch.linalg.svd(_f64(delta), full_matrices=False)
    A, B = _flexlora_split(U, S, Vh, rank, float(scaling), tuple(delta.shape), module)
    dt = dtype or delta.dtype
    return LoraFactors(A.to(dt), B.to(dt))


def flexlora_aggregate(factors: Sequence[tuple[torch.Tensor, torch.Tensor]], ranks: Sequence[int],
                       weights: Optional[Sequence[float]] = None, scalings: Optional[Sequence[float]] = None,
                       target_scalings: Optional[Sequence[float]] = None, *, module: str = "") -> list[LoraFactors]:
    """FlexLoRA (Bai, Chen, Qian, Yao, Li: "Federated Fine-tuning of Large Language Models under
    Heterogeneous Tasks and Client Resources", NeurIPS 2024): aggregate the full deltas
    W_i = s_i B_i @ A_i by their weighted mean (exact), then give each receiving client factors
    of its own rank by truncated SVD of that mean (one SVD, sliced per rank; split convention
    as in :func:`flexlora_redistribute`).

    Preserves exactly the mean delta; a client of rank r receives its best rank-r
    approximation, exact when r >= rank(mean delta). ``ranks[k]`` and ``target_scalings[k]``
    (default 1) describe the k-th receiving client. Returns one (A, B) per entry of ``ranks``.

    Raises:
        ValueError: a rank above min(out, in), or as :func:`flora_stack`.
    """
    fs = [_check_factors(A, B, module) for A, B in factors]
    delta = flora_delta64(fs, weights, scalings)
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    ts = _scalings(target_scalings, len(ranks))
    out = []
    for r, s in zip(ranks, ts):
        A, B = _flexlora_split(U, S, Vh, r, s, tuple(delta.shape), module)
        out.append(LoraFactors(A.to(fs[0].A.dtype), B.to(fs[0].B.dtype)))
    return out


# --------------------------------------------------------------------------------------------
# HetLoRA
# --------------------------------------------------------------------------------------------


def hetlora_pad(A: torch.Tensor, B: torch.Tensor, rank: int) -> LoraFactors:
    """Zero-pad a client's factors to ``rank``: A gets zero rows, B zero columns; B @ A is
    unchanged. Returns (A, B).

    Raises:
        ValueError: ``rank`` is below the factors' rank.
    """
    f = _check_factors(A, B)
    r = f.rank
    if rank < r:
        raise ValueError(f"cannot zero-pad rank-{r} factors to the smaller rank {rank}")
    A_pad = torch.zeros((rank, A.shape[1]), dtype=A.dtype, device=A.device)
    B_pad = torch.zeros((B.shape[0], rank), dtype=B.dtype, device=B.device)
    A_pad[:r] = A
    B_pad[:, :r] = B
    return LoraFactors(A_pad, B_pad)


def hetlora_truncate(A: torch.Tensor, B: torch.Tensor, rank: int, scaling: Optional[float] = None) -> LoraFactors:
    """The first ``rank`` components: A[:rank] and B[:, :rank] (HetLoRA's distribution step).

    ``scaling``: the receiving client's peft scaling s (alpha / r) when the factors carry
    folded scalings (see the module docstring); B is then divided by s. Returns (A, B).

    Raises:
        ValueError: ``rank`` is not in 1..current rank.
    """
    f = _check_factors(A, B)
    if not 1 <= rank <= f.rank:
        raise ValueError(f"cannot truncate rank-{f.rank} factors to rank {rank}")
    A_t, B_t = A[:rank].clone(), B[:, :rank].clone()
    if scaling is not None:
        B_t = (_f64(B_t) / _scalings([scaling], 1)[0]).to(B.dtype)
    return LoraFactors(A_t, B_t)


def _delta_norm64(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """||B @ A||_F without forming the (out x in) product: sqrt(<B^T B, A A^T>) (r x r)."""
    A64, B64 = _f64(A), _f64(B)
    return torch.sqrt(((B64.T @ B64) * (A64 @ A64.T)).sum().clamp_min(0.0))


def hetlora_sparsity_weights(factors: Sequence[tuple[torch.Tensor, torch.Tensor]],
                             scalings: Optional[Sequence[float]] = None) -> list[float]:
    """HetLoRA's sparsity weights: ||S_i|| / Z with S_i = s_i B_i @ A_i (the client's update of
    this module; s_i default 1), ||.|| the Frobenius norm and Z = sum_i ||S_i||. If every
    update is zero the weights fall back to uniform (there is nothing to prefer)."""
    fs = [_check_factors(A, B) for A, B in factors]
    ss = _scalings(scalings, len(fs))
    norms = [float(_delta_norm64(f.A, f.B)) * s for f, s in zip(fs, ss)]
    total = sum(norms)
    if not math.isfinite(total):
        raise ValueError(f"HetLoRA sparsity weights: an update norm is not finite ({norms})")
    if total == 0:
        return [1.0 / len(fs)] * len(fs)
    return [n / total for n in norms]


def hetlora_aggregate(factors: Sequence[tuple[torch.Tensor, torch.Tensor]], scalings: Optional[Sequence[float]] = None,
                      rank: Optional[int] = None, *, module: str = "") -> LoraFactors:
    """HetLoRA (Cho, Liu, Xu, Fahrezi, Joshi: "Heterogeneous LoRA for Federated Fine-tuning of
    On-Device Foundation Models", EMNLP 2024 main conference, pp. 12903-12913) server step:
    zero-pad every client's factors to the global rank (default: the largest client rank),
    then average them with the sparsity weights ||S_i||_F / Z (:func:`hetlora_sparsity_weights`,
    computed per module from the client's own update S_i = s_i B_i A_i, *not* from example
    counts). Clients receive :func:`hetlora_truncate` of the result at their rank.

    What is exact: padding and truncation (padding does not change B_i @ A_i; a client's
    own components are its first r_i). What is not: like naive averaging, the product of the
    averaged factors has cross terms, so it is not the mean update; the sparsity weights damp
    clients whose update is small. With ``scalings``, s_i is folded into B_i first and the
    result carries scaling 1 (unfold with ``hetlora_truncate(..., scaling=s)``).

    Raises:
        ValueError: clients disagree on (in, out), or ``rank`` is below a client's rank.
    """
    fs = [_check_factors(A, B, module) for A, B in factors]
    ss = _scalings(scalings, len(fs))
    shapes = {(f.A.shape[1], f.B.shape[0]) for f in fs}
    if len(shapes) > 1:
        raise ValueError(f"HetLoRA aggregates factors of one layer; clients disagree on (in, out): {sorted(shapes)}")
    r_glob = max(f.rank for f in fs) if rank is None else rank
    ws = hetlora_sparsity_weights(fs, ss)
    A = torch.zeros((r_glob, fs[0].A.shape[1]), dtype=torch.float64, device=fs[0].A.device)
    B = torch.zeros((fs[0].B.shape[0], r_glob), dtype=torch.float64, device=fs[0].B.device)
    for f, s, w in zip(fs, ss, ws):
        A_p, B_p = hetlora_pad(_f64(f.A), _f64(f.B) * s, r_glob)
        A += w * A_p
        B += w * B_p
    return LoraFactors(A.to(fs[0].A.dtype), B.to(fs[0].B.dtype))


def hetlora_tail_start(rank: int, gamma: float, min_rank: int = 1) -> int:
    """First index of HetLoRA's prunable tail: max(floor(gamma * rank), min_rank), capped at
    ``rank`` (no tail). ``gamma`` in (0, 1) is the paper's decaying factor."""
    if not 0 < gamma < 1:
        raise ValueError(f"HetLoRA's decaying factor gamma must be in (0, 1); got {gamma}")
    return min(rank, max(int(math.floor(gamma * rank)), min_rank))


def hetlora_tail_norm(A: torch.Tensor, B: torch.Tensor, gamma: float, min_rank: int = 1) -> float:
    """||B[:, k:] @ A[k:]||_F with k = :func:`hetlora_tail_start`: the norm of the update made by
    the trailing rank components (0.0 when there is no tail)."""
    f = _check_factors(A, B)
    k = hetlora_tail_start(f.rank, gamma, min_rank)
    return float(_delta_norm64(A[k:], B[:, k:])) if k < f.rank else 0.0


def hetlora_regularizer(A: torch.Tensor, B: torch.Tensor, gamma: float, min_rank: int = 1) -> torch.Tensor:
    """Differentiable ||B[:, k:] @ A[k:]||_F (the tail of :func:`hetlora_tail_norm`), the term
    HetLoRA adds, times lambda, to the local loss to push the trailing components to zero.
    Computed as sqrt(<B_t^T B_t, A_t A_t^T>) so the (out x in) product is never formed; its
    gradient at 0 is 0, not NaN."""
    f = _check_factors(A, B)
    k = hetlora_tail_start(f.rank, gamma, min_rank)
    if k >= f.rank:
        return A.new_zeros(())
    At, Bt = A[k:], B[:, k:]
    sq = ((Bt.T @ Bt) * (At @ At.T)).sum()
    return sq.clamp_min(torch.finfo(sq.dtype).tiny).sqrt()


def hetlora_prune(A: torch.Tensor, B: torch.Tensor, gamma: float, before: float,
                  min_rank: int = 1) -> tuple[torch.Tensor, torch.Tensor, int]:
    """HetLoRA's rank self-pruning, the client's step after local training.

    The tail is the trailing components k..r-1 with k = max(floor(gamma * r), min_rank)
    (:func:`hetlora_tail_start`; gamma < 1 is the paper's decaying factor, e.g. 0.99 prunes one
    component at a time for r < 100). The rule: if the tail's update norm ||B_t A_t||_F after
    local training is smaller than ``before``, the same norm measured on the factors the client
    started the round with (:func:`hetlora_tail_norm` on the received, truncated factors), the
    regularizer has succeeded in shrinking the tail and the client drops it: the new rank is k.
    Otherwise the factors are returned unchanged. One step per round, never below ``min_rank``.

    Note: this is our reading of the paper's rank self-pruning (the regularized tail is pruned once its
    norm has decreased over local training), cross-checked against public re-implementations;
    it is a relative test against the pre-training norm, not a fixed absolute threshold. An
    absolute threshold is the special case ``before=threshold``.

    Returns:
        (A', B', new_rank): A' = A[:new_rank], B' = B[:, :new_rank] (copies).
    """
    f = _check_factors(A, B)
    k = hetlora_tail_start(f.rank, gamma, min_rank)
    if k < f.rank and hetlora_tail_norm(A, B, gamma, min_rank) < float(before):
        return A[:k].clone(), B[:, :k].clone(), k
    return A.clone(), B.clone(), f.rank


# --------------------------------------------------------------------------------------------
# dict-level strategies (what the round calls)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoraRound:
    """One round's inputs to a LoRA-aware aggregation.

    Attributes:
        global_params: the server's trainable params before the round (the download; for
            heterogeneous ranks the factors at the global rank).
        client_params: each client's params *after* local training (absolute values, not
            deltas), holding the names that client sends (see ``LoraAggregation.sends``).
        weights: per-client aggregation weights (example counts); None = uniform.
        scalings: per-client peft scaling alpha / r_i; None = all equal (see the module docstring).
        target_ranks: flora/flexlora/hetlora: ranks of the clients to serve next; the result's
            ``client_params`` has one entry per target. None = no per-client downloads, except
            flexlora, which then serves the submitting clients at their own ranks.
        target_scalings: the targets' peft scalings (default 1, or ``scalings`` when the
            targets are the submitting clients); hetlora uses them only with ``scalings``
            (factors folded), flora never (fresh factors have B = 0).
        generator: flora: the seeded generator that re-initializes lora_A.
    """

    global_params: NamedTensors
    client_params: Sequence[NamedTensors]
    weights: Optional[Sequence[float]] = None
    scalings: Optional[Sequence[float]] = None
    target_ranks: Optional[Sequence[int]] = None
    target_scalings: Optional[Sequence[float]] = None
    generator: Optional[torch.Generator] = None


@dataclass(frozen=True)
class LoraRoundResult:
    """A LoRA-aware aggregation's output.

    Attributes:
        params: the new global params, in the order of ``global_params``, holding the names
            the server owns (fedsa: no lora_B).
        client_params: per-target downloads (``LoraRound.target_ranks``), for methods that
            serve different factors to different clients (flexlora, hetlora, flora).
        merge_into_base: flora only: module -> (out x in) delta that MUST be added to that
            module's frozen base weight (W += delta; transpose for fan_in_fan_out layers).
        exact_deltas: flexlora only: module -> the exact mean delta (scaling folded in), for
            diagnostics or for evaluating a merged global model; not to be merged as well.
    """

    params: dict[str, torch.Tensor]
    client_params: tuple[dict[str, torch.Tensor], ...] = ()
    merge_into_base: dict[str, torch.Tensor] = field(default_factory=dict)
    exact_deltas: dict[str, torch.Tensor] = field(default_factory=dict)


class LoraAggregation(Protocol):
    """A LoRA-aware aggregation strategy (registered in ``LORA_AGGREGATIONS``)."""

    name: str
    heterogeneous: bool
    """Whether clients may hold different ranks."""

    def trains(self, name: str) -> bool:
        """Whether parameter ``name`` trains on the client."""
        ...

    def sends(self, name: str) -> bool:
        """Whether parameter ``name`` travels client -> server (False: frozen, or kept local)."""
        ...

    def aggregate(self, rnd: LoraRound) -> LoraRoundResult:
        ...


LORA_AGGREGATIONS: Registry[LoraAggregation] = Registry("lora aggregation")


def _mean_rest(groups: Sequence[LoraGroups], weights: Optional[Sequence[float]]) -> dict[str, torch.Tensor]:
    names = list(groups[0].rest)
    for i, g in enumerate(groups):
        if list(g.rest) != names:
            raise ValueError(f"client {i} sends non-LoRA parameters {sorted(g.rest)[:3]}..., "
                             f"client 0 sends {sorted(names)[:3]}...; every client must send the same ones")
    return {n: weighted_mean([g.rest[n] for g in groups], weights) for n in names}


def _modules(groups: Sequence[LoraGroups]) -> list[str]:
    mods = list(groups[0].factors)
    for i, g in enumerate(groups):
        if list(g.factors) != mods:
            raise ValueError(f"client {i} sends LoRA modules {sorted(g.factors)[:3]}..., client 0 "
                             f"sends {sorted(mods)[:3]}...; every client must send the same modules")
    return mods


def _ordered(global_params: NamedTensors, values: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``values`` in the order of ``global_params`` (the wire order); every name must be there."""
    missing = [n for n in global_params if n not in values]
    if missing:
        raise ValueError(f"the clients sent no value for {missing[:3]} (held by the server)")
    return {n: values[n] for n in global_params}


def _target_scalings(rnd: LoraRound, n_targets: int, own: bool) -> list[float]:
    if rnd.target_scalings is not None:
        return _scalings(rnd.target_scalings, n_targets)
    if own and rnd.scalings is not None:
        return _scalings(rnd.scalings, n_targets)
    if rnd.scalings is not None and len(set(rnd.scalings)) > 1:
        raise ValueError("clients used different LoRA scalings; give target_scalings for the targets")
    return [1.0 if rnd.scalings is None else float(rnd.scalings[0])] * n_targets


def _everything(self: object, name: str) -> bool:
    """Every parameter trains / is sent (the strategies that do not split A from B)."""
    return True


@dataclass(frozen=True)
class _Naive:
    name: str = "naive"
    heterogeneous: bool = False

    trains = _everything
    sends = _everything

    def aggregate(self, rnd: LoraRound) -> LoraRoundResult:
        """FedAvg on every parameter, factors included (:func:`naive_aggregate`)."""
        groups = [group_lora(p) for p in rnd.client_params]
        factors = {m: naive_aggregate([g.factors[m] for g in groups], rnd.weights, module=m)
                   for m in _modules(groups)}
        values = groups[0].to_params(factors, _mean_rest(groups, rnd.weights))
        return LoraRoundResult(params=_ordered(rnd.global_params, values))


@dataclass(frozen=True)
class _Ffa:
    name: str = "ffa"
    heterogeneous: bool = False

    def trains(self, name: str) -> bool:
        return ffa_trainable(name)

    def sends(self, name: str) -> bool:
        return ffa_trainable(name)

    def aggregate(self, rnd: LoraRound) -> LoraRoundResult:
        """lora_A: checked against the global value and kept; everything else: weighted mean.
        A lora_B whose lora_A is absent (frozen, hence not communicated) is simply averaged."""
        values: dict[str, torch.Tensor] = {}
        for name, g in rnd.global_params.items():
            if lora_role(name) == "A":
                for i, p in enumerate(rnd.client_params):
                    if name in p:
                        _ffa_check_A(i, p[name], g, lora_module(name))
                values[name] = g
            else:
                missing = [i for i, p in enumerate(rnd.client_params) if name not in p]
                if missing:
                    raise ValueError(f"FFA-LoRA: clients {missing[:5]} did not send {name!r}")
                values[name] = weighted_mean([p[name] for p in rnd.client_params], rnd.weights)
        for i, p in enumerate(rnd.client_params):
            unknown = [n for n in p if n not in rnd.global_params]
            if unknown:
                raise ValueError(f"FFA-LoRA: client {i} sent parameters the server does not hold: {unknown[:3]}")
        return LoraRoundResult(params=values)


@dataclass(frozen=True)
class _FedSa:
    name: str = "fedsa"
    heterogeneous: bool = False

    def trains(self, name: str) -> bool:
        return True

    def sends(self, name: str) -> bool:
        return fedsa_shared(name)

    def aggregate(self, rnd: LoraRound) -> LoraRoundResult:
        """lora_A and the rest: weighted mean; lora_B: never received, never in the output."""
        for i, p in enumerate(rnd.client_params):
            sent_b = [n for n in p if lora_role(n) == "B"]
            if sent_b:
                raise ValueError(f"FedSA-LoRA keeps lora_B on the client, but client {i} sent {sent_b[:3]}; "
                                 "filter the upload with fedsa_shared")
        values = {}
        for name in rnd.global_params:
            if lora_role(name) == "B":
                continue
            missing = [i for i, p in enumerate(rnd.client_params) if name not in p]
            if missing:
                raise ValueError(f"FedSA-LoRA: clients {missing[:5]} did not send {name!r}")
            tensors = [p[name] for p in rnd.client_params]
            values[name] = (fedsa_aggregate(tensors, rnd.weights) if lora_role(name) == "A"
                            else weighted_mean(tensors, rnd.weights))
        return LoraRoundResult(params=values)


def _truncated_downloads(global_values: Mapping[str, torch.Tensor], groups: LoraGroups,
                         factors: Mapping[str, LoraFactors], ranks: Sequence[int],
                         scalings: Sequence[float], folded: bool) -> tuple[dict[str, torch.Tensor], ...]:
    out = []
    for r, s in zip(ranks, scalings):
        fs = {m: hetlora_truncate(f.A, f.B, r, s if folded else None) for m, f in factors.items()}
        out.append(groups.to_params(fs, {n: global_values[n] for n in groups.rest}))
    return tuple(out)


@dataclass(frozen=True)
class _Flora:
    name: str = "flora"
    heterogeneous: bool = True

    trains = _everything
    sends = _everything

    def aggregate(self, rnd: LoraRound) -> LoraRoundResult:
        """Per module: merge_into_base = sum_i p_i s_i B_i A_i (stacked, exact); new factors:
        fresh (A ~ kaiming-uniform from ``rnd.generator``, B = 0) at the global rank; targets
        get their first r rows/columns (still a valid fresh init). Rest: weighted mean."""
        if rnd.generator is None:
            raise ValueError("flora re-initializes lora_A each round and needs LoraRound.generator (seeded)")
        groups = [group_lora(p) for p in rnd.client_params]
        glob = group_lora(rnd.global_params)
        merge, fresh = {}, {}
        for m in _modules(groups):
            fs = [g.factors[m] for g in groups]
            merge[m] = flora_delta64(fs, rnd.weights, rnd.scalings).to(torch.promote_types(fs[0].A.dtype, fs[0].B.dtype))
            gA, gB = glob.factors[m]
            fresh[m] = reinit_lora(gA.shape, gB.shape, rnd.generator, dtype=gA.dtype, device=gA.device)
        rest = _mean_rest(groups, rnd.weights)
        params = _ordered(rnd.global_params, glob.to_params(fresh, rest))
        downloads: tuple[dict[str, torch.Tensor], ...] = ()
        if rnd.target_ranks is not None:
            downloads = _truncated_downloads(params, glob, fresh, rnd.target_ranks,
                                             [1.0] * len(rnd.target_ranks), folded=False)
        return LoraRoundResult(params=params, client_params=downloads, merge_into_base=merge)


@dataclass(frozen=True)
class _FlexLora:
    name: str = "flexlora"
    heterogeneous: bool = True

    trains = _everything
    sends = _everything

    def aggregate(self, rnd: LoraRound) -> LoraRoundResult:
        """Per module: exact mean delta, then truncated-SVD factors at the global rank
        (``params``, scaling 1 unless all clients share one) and at each target's rank
        (``client_params``; default targets: the submitting clients at their own ranks)."""
        groups = [group_lora(p) for p in rnd.client_params]
        glob = group_lora(rnd.global_params)
        mods = _modules(groups)
        own = rnd.target_ranks is None
        n_t = len(groups) if own else len(rnd.target_ranks)  # type: ignore[arg-type]
        t_scal = _target_scalings(rnd, n_t, own)
        g_scal = 1.0 if rnd.scalings is None or len(set(rnd.scalings)) > 1 else float(rnd.scalings[0])
        global_f, deltas = {}, {}
        per_target: list[dict[str, LoraFactors]] = [{} for _ in range(n_t)]
        for m in mods:
            fs = [g.factors[m] for g in groups]
            delta = flora_delta64(fs, rnd.weights, rnd.scalings)
            deltas[m] = delta.to(torch.promote_types(fs[0].A.dtype, fs[0].B.dtype))
            U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
            ranks = [f.rank for f in fs] if own else list(rnd.target_ranks)  # type: ignore[arg-type]
            dA, dB = fs[0].A.dtype, fs[0].B.dtype
            gA = glob.factors[m].A
            A, B = _flexlora_split(U, S, Vh, gA.shape[0], g_scal, tuple(delta.shape), m)
            global_f[m] = LoraFactors(A.to(gA.dtype), B.to(glob.factors[m].B.dtype))
            for k, (r, s) in enumerate(zip(ranks, t_scal)):
                A, B = _flexlora_split(U, S, Vh, r, s, tuple(delta.shape), m)
                per_target[k][m] = LoraFactors(A.to(dA), B.to(dB))
        rest = _mean_rest(groups, rnd.weights)
        params = _ordered(rnd.global_params, glob.to_params(global_f, rest))
        downloads = tuple(glob.to_params(f, rest) for f in per_target)
        return LoraRoundResult(params=params, client_params=downloads, exact_deltas=deltas)


@dataclass(frozen=True)
class _HetLora:
    name: str = "hetlora"
    heterogeneous: bool = True

    trains = _everything
    sends = _everything

    def aggregate(self, rnd: LoraRound) -> LoraRoundResult:
        """Per module: zero-pad to the global rank (that of ``global_params``) and average with
        the sparsity weights (:func:`hetlora_aggregate`); targets get the first r components.
        Rest (heads): weighted mean by ``rnd.weights`` (the paper defines sparsity weights for
        LoRA modules only). With ``scalings`` the global factors carry scaling 1 (folded)."""
        groups = [group_lora(p) for p in rnd.client_params]
        glob = group_lora(rnd.global_params)
        factors = {}
        for m in _modules(groups):
            r_glob = glob.factors[m].rank
            factors[m] = hetlora_aggregate([g.factors[m] for g in groups], rnd.scalings, r_glob, module=m)
        rest = _mean_rest(groups, rnd.weights)
        params = _ordered(rnd.global_params, glob.to_params(factors, rest))
        downloads: tuple[dict[str, torch.Tensor], ...] = ()
        if rnd.target_ranks is not None:
            t_scal = _scalings(rnd.target_scalings, len(rnd.target_ranks))
            downloads = _truncated_downloads(params, glob, factors, rnd.target_ranks, t_scal,
                                             folded=rnd.scalings is not None)
        return LoraRoundResult(params=params, client_params=downloads)


for _strategy in (_Naive(), _Ffa(), _FedSa(), _Flora(), _FlexLora(), _HetLora()):
    LORA_AGGREGATIONS.register(_strategy.name)(_strategy)
