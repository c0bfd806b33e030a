"""One federated round as numbered steps, state in and state out."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import numpy as np

from fedfm.aggregators.base import Aggregator
from fedfm.algorithms.base import Algorithm
from fedfm.pipeline import UpdatePipeline
from fedfm.runtime.base import Runtime
from fedfm.tensors import add_into_, l2_norm64
from fedfm.types import ClientResult, ClientTask, ModelUpdate, NamedTensors, RoundReport, ServerState

if TYPE_CHECKING:
    from fedfm.federation import SystemPlan

log = logging.getLogger("fedfm.round")


@dataclass(frozen=True)
class RoundPlan:
    """The fixed pieces every round uses (no per-round state lives here)."""

    algorithm: Algorithm
    aggregator: Aggregator
    runtime: Runtime
    num_clients: int
    clients_per_round: int
    seed: int
    pipeline: UpdatePipeline = field(default_factory=UpdatePipeline)
    max_update_norm: Optional[float] = 1e6
    """Updates with a larger L2 norm are rejected as malformed (a sanity bound, not robustness)."""
    lora: Any = None
    """A LoRA-aware aggregation (fedfm.adapters.lora_aggregation: hetlora, flexlora) that combines the
    clients' factors in place of the aggregator; None = the aggregator on the deltas."""
    lora_scaling: float = 1.0
    """peft's LoRA scaling alpha / r of the model (FLoRA merges the product as the model applies it)."""
    merge_base: Optional[Callable[[dict], None]] = None
    """Sets the shared model's frozen base weights to their initial values plus FLoRA's accumulated
    merge (module -> delta)."""
    system: "Optional[SystemPlan]" = None
    """Client speeds, availability, deadline and async mode (fedfm.federation); None = every sampled
    client trains fully and no simulated time is kept."""
    downlink: Any = None
    """Downlink compression (fedfm.compression.downlink.Downlink): each client gets a compressed
    correction of the replica it holds; None = every client gets the global state."""


def run_round(
    state: ServerState, plan: RoundPlan, on_result: Optional[Callable[[ClientResult], Any]] = None
) -> tuple[ServerState, RoundReport]:
    """Run round ``state.round + 1`` and return the new state and its report."""
    if plan.system is not None and plan.system.mode == "async":
        from fedfm.federation import run_async_round

        return run_async_round(state, plan, on_result)
    start = time.perf_counter()
    rnd = state.round + 1
    # 1. sample the cohort; unreachable clients drop out, stragglers are cut at the deadline
    cohort = sample_cohort(plan.seed, rnd, plan.num_clients, plan.clients_per_round)
    caps: dict[int, int] = {}
    dropped: list[dict] = []
    sim_time = None
    if plan.system is not None:
        from fedfm import wire
        from fedfm.federation import participation
        from fedfm.federation import sim_time as clock
        from fedfm.runtime.client import download_bytes, params_bytes

        # each client's own transfers: its download exactly, its reply estimated as its trainable
        # params (uncompressed: the reply's real size is known only once it is sent)
        down: "dict[int, int] | int" = 0
        up: "dict[int, int] | int" = 0
        if plan.system.profile.bandwidth is not None:  # transfers take simulated time only then
            full = wire.encoded_size(state.params)
            planned = make_tasks(state, rnd, cohort, plan, send=False)
            down = {t.client_id: download_bytes(t, full) for t in planned}
            up = {t.client_id: params_bytes(t, full) for t in planned}
        part = participation(plan.system, rnd, cohort, down, up)
        cohort, caps, dropped = part.clients, part.caps, part.dropped
        sim_time = clock(state.extra) + part.round_time
    # 2. one task per client: the global trainable params, the algorithm's and the pipeline's payload
    tasks = make_tasks(state, rnd, cohort, plan, caps)
    hook = getattr(plan.algorithm, "before_aggregate", None)
    stream = MeanStream(plan, state.params) if streams(plan, state.params, len(cohort)) else None
    # 3. the runtime delivers tasks and collects payloads (each client: train, clip, noise, compress);
    # with a plain mean, each update is folded into the sum as it arrives (4. and 5. per client)
    results = plan.runtime.run(tasks, on_result if stream is None else stream.feeding(on_result))
    # 4. decode payloads; reject malformed ones (bad payload, NaN/Inf, wrong names or shapes)
    if stream is not None:
        received = stream.finish(results)
        accepted, rejected = [], list(stream.rejected)
    else:
        received = [plan.pipeline.receive(r, state.params) for r in results]
        accepted, rejected = screen(received, state.params, plan.max_update_norm)
    for r in rejected:
        log.warning("round %d: update of client %d rejected: %s", rnd, r["client"], r["reason"])
    for r in dropped:
        log.info("round %d: client %d left out: %s", rnd, r["client"], r["reason"])
    # 5. aggregate (secure sum, central noise or the aggregator) and 6. the algorithm's server step
    params, opt_state, extra = dict(state.params), dict(state.opt_state), dict(state.extra)
    if accepted and hook is not None:  # FedNova's normalisation, SCAFFOLD's control variate
        uniform = getattr(plan.aggregator, "weighting", "examples") == "uniform"
        updates, opt_state = hook([r.update for r in accepted], [r.metrics for r in accepted], opt_state,
                                  plan.num_clients, uniform)
        accepted = [replace(r, update=u) for r, u in zip(accepted, updates)]
    if accepted and plan.lora is not None:  # hetlora, flexlora, flora: the strategy combines the factors
        from fedfm import wire
        from fedfm.adapters.ranks import MERGED, combine
        from fedfm.pipeline import Aggregate, generator

        uniform = getattr(plan.aggregator, "weighting", "examples") == "uniform"
        model_rank = plan.pipeline.model_rank or 0
        ranks = [int(r.metrics.get("lora_rank", plan.pipeline.rank_of(r.client_id) or model_rank)) for r in accepted]
        delta, merges, stack_bytes = combine(plan.lora, state.params, [r.update for r in accepted], uniform,
                                             scaling=plan.lora_scaling, generator=generator(plan.seed, rnd, 0xF10A),
                                             ranks=ranks if model_rank else None)
        agg = Aggregate(delta, dict(state.extra))
        algo_state = {k: v for k, v in opt_state.items() if not k.startswith(MERGED)}
        params, algo_state = plan.algorithm.server_update(state.params, algo_state, agg.delta)
        opt_state = {**algo_state, **{k: v for k, v in opt_state.items() if k.startswith(MERGED)}}
        if merges:  # FLoRA: the stacked product goes into the frozen base weights, kept in the state
            for m, d in merges.items():
                key = MERGED + m
                opt_state[key] = opt_state[key] + d if key in opt_state else d.clone()
            if plan.merge_base is not None:  # the base becomes W0 + the accumulated merge
                plan.merge_base({k[len(MERGED):]: v for k, v in opt_state.items() if k.startswith(MERGED)})
            # every client must merge this round's stack too: the bytes it costs, by round
            agg.extra[FLORA_STACKS] = [*agg.extra.get(FLORA_STACKS, []), [rnd, stack_bytes]]
            agg.extra[FLORA_DENSE] = wire.encoded_size({k: v for k, v in opt_state.items() if k.startswith(MERGED)})
        extra = agg.extra
    elif stream is not None:
        delta = stream.mean()
        if delta is not None:
            params, opt_state = plan.algorithm.server_update(state.params, opt_state, delta)
    elif accepted:
        agg = plan.pipeline.aggregate(accepted, state.extra, rnd, plan.aggregator)
        extra, rejected = agg.extra, rejected + list(agg.dropped)
        if agg.delta is not None:
            params, opt_state = plan.algorithm.server_update(state.params, opt_state, agg.delta)
    rejected = dropped + rejected
    if FLORA_STACKS in extra:  # the cohort now holds every merge up to the previous round
        extra[FLORA_SYNCED] = {**extra.get(FLORA_SYNCED, {}), **{str(t.client_id): rnd - 1 for t in tasks}}
    reported = {str(r.client_id): int(r.metrics["lora_rank"]) for r in results if "lora_rank" in r.metrics}
    if reported:
        extra[REPORTED_RANKS] = {**extra.get(REPORTED_RANKS, {}), **reported}
    # 7. charge the round's privacy cost
    extra, epsilon = plan.pipeline.account(extra, cohort, received)
    if sim_time is not None:
        from fedfm.federation import SIM_TIME

        extra[SIM_TIME] = sim_time
    report = RoundReport(
        round=rnd, clients=tuple(cohort), train_loss=_weighted_loss(accepted) if stream is None else stream.loss(),
        bytes_up=sum(r.bytes_up for r in results), bytes_down=sum(r.bytes_down for r in results),
        rejected=tuple(rejected), wall_s=time.perf_counter() - start,
        epsilon=epsilon, delta=plan.pipeline.delta if epsilon is not None else None, sim_time=sim_time,
    )
    return ServerState(round=rnd, params=params, opt_state=opt_state, extra=extra), report


STREAM_ABOVE = 1 << 24
"""Elements (cohort x trainable size) above which a round streams its mean: 64 MB of float32
updates. Below it, the batch path's stacked screen and mean are faster (one call per name for the
cohort, where streaming costs a few calls per client) and its memory is small anyway."""


def streams(plan: RoundPlan, params: Optional[NamedTensors] = None, cohort: int = 0) -> bool:
    """Whether the round folds each update into a running mean as it arrives: the runtime hands
    over results one at a time and keeps what ``on_result`` returns (``streams_results``), the
    cohort's updates are large (``STREAM_ABOVE``, at least 3 clients; not checked without
    ``params``) and the aggregation is the plain weighted mean, with nothing that needs the
    cohort's updates together (a robust rule, secure aggregation, central DP's clipping and
    noise, DP-SGD's accounting, an algorithm's cohort hook, a LoRA-aware strategy)."""
    from fedfm.aggregators.mean import WeightedMean

    if params is not None and (cohort < 3 or sum(v.numel() for v in params.values()) * cohort <= STREAM_ABOVE):
        return False  # one or two clients: the batch path holds no more than the float64 sum would
    return (getattr(plan.runtime, "streams_results", False) and type(plan.aggregator) is WeightedMean
            and plan.lora is None and plan.pipeline.secagg is None and plan.pipeline.mechanism in ("none", "local")
            and getattr(plan.algorithm, "before_aggregate", None) is None)


class MeanStream:
    """The weighted mean, accumulated one update at a time (float64, as ``weighted_sum``).

    Each result is decoded and checked as it arrives, exactly as ``screen`` would, and folded into
    sum_i w_i delta_i; the runtime then keeps the result without its payload. A round of clients
    with large updates holds one float64 accumulator instead of every client's update (full
    fine-tuning of a 11M-parameter model over 10 clients: 88 MB instead of 440 MB). The mean is
    the batch one up to float64 rounding: sum_i (w_i / W) delta_i and (sum_i w_i delta_i) / W
    differ in the last float64 bits, which casting back to float32 almost always erases."""

    def __init__(self, plan: RoundPlan, params: NamedTensors) -> None:
        self.plan, self.params = plan, params
        self.uniform = getattr(plan.aggregator, "weighting", "examples") == "uniform"
        self.acc: Optional[dict[str, Any]] = None
        self.total = 0.0
        self.loss_sum, self.examples = 0.0, 0
        self.kept: dict[int, ClientResult] = {}  # client -> its result as kept (no payload, no update)
        self.rejected: list[dict] = []

    def feeding(self, on_result: Optional[Callable[[ClientResult], Any]]) -> Callable[[ClientResult], ClientResult]:
        def fold(result: ClientResult) -> ClientResult:
            if on_result is not None:
                returned = on_result(result)
                result = returned if isinstance(returned, ClientResult) else result
            return self.add(result)
        return fold

    def add(self, result: ClientResult) -> ClientResult:
        import torch

        r = self.plan.pipeline.receive(result, self.params)
        reason = r.error if r.update is None else check_structure(r.update, self.params)
        if reason is None:
            reason = check_values(r.update, l2_norm64(r.update.delta), self.plan.max_update_norm)  # type: ignore[union-attr]
        if reason is not None:
            self.rejected.append({"client": r.client_id, "reason": reason})
        else:
            u = r.update
            w = 1.0 if self.uniform else float(u.weight)  # type: ignore[union-attr]
            if self.acc is None:
                self.acc = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in self.params.items()}
            for k, v in u.delta.items():  # type: ignore[union-attr]
                add_into_(self.acc[k], v, w)
            self.total += w
            self.loss_sum += float(r.metrics["train_loss"]) * u.num_examples  # type: ignore[union-attr]
            self.examples += u.num_examples  # type: ignore[union-attr]
        kept = replace(r, payload=None, update=None)
        self.kept[r.client_id] = kept
        return kept

    def finish(self, results: Sequence[ClientResult]) -> list[ClientResult]:
        """The round's results as kept; a result the runtime did not hand to ``on_result`` is folded now.

        Raises:
            RuntimeError: the runtime returned a result other than the one ``on_result`` handed
                back (it changed a result after it was folded in: the sum cannot honour that)."""
        out = []
        for r in results:
            if r.client_id not in self.kept:
                out.append(self.add(r))
            elif r is not self.kept[r.client_id]:
                raise RuntimeError(f"the runtime returned a different result for client {r.client_id} than the one "
                                   "on_result handed back; a streaming round has already summed the first one "
                                   "(set streams_results = False on a runtime that rewrites results)")
            else:
                out.append(r)
        return out

    def mean(self) -> Optional[dict[str, Any]]:
        if self.acc is None:
            return None
        if self.total <= 0:
            raise ValueError(f"aggregation weights sum to {self.total}; need a positive total")
        acc, self.acc = self.acc, None  # divided in place, and each float64 sum freed once cast
        out = {}
        for k in list(acc):
            out[k] = acc.pop(k).div_(self.total).to(self.params[k].dtype)
        return out

    def loss(self) -> float:
        return self.loss_sum / self.examples if self.examples else float("nan")


def sample_cohort(seed: int, rnd: int, num_clients: int, k: int) -> list[int]:
    """k distinct clients, uniformly, from a generator keyed by (seed, round): resumable."""
    rng = np.random.default_rng([seed, rnd, 0xC0])
    return sorted(int(c) for c in rng.choice(num_clients, size=k, replace=False))


FLORA_STACKS, FLORA_SYNCED, FLORA_DENSE = "flora_stacks", "flora_synced", "flora_dense_bytes"
"""ServerState.extra keys (FLoRA): [round, bytes] of every merged stack; client -> the last round
whose merge it holds; the encoded size of the whole merged delta (what a client far behind gets)."""


def flora_catch_up(extra: "dict | Any", client: int) -> int:
    """Bytes a FLoRA client downloads to bring its base up to date: the stacks merged since it
    last took part, or the whole merged delta if that is smaller."""
    stacks = extra.get(FLORA_STACKS)
    if not stacks:
        return 0
    since = int(extra.get(FLORA_SYNCED, {}).get(str(client), 0))
    missing = sum(int(b) for r, b in stacks if int(r) > since)
    return min(missing, int(extra.get(FLORA_DENSE, missing))) if missing else 0


REPORTED_RANKS = "lora_ranks"
"""ServerState.extra key: client -> the LoRA rank it last reported (HetLoRA self-pruning)."""


def make_tasks(state: ServerState, rnd: int, cohort: Sequence[int], plan: RoundPlan,
               caps: Optional[dict[int, int]] = None, send: bool = True) -> list[ClientTask]:
    """``caps``: client -> cap on its local steps this round (a straggler's partial work).
    ``send=False`` plans the tasks without sending anything: with downlink compression, the
    clients' replicas are left as they are (each task then carries the global params)."""
    from fedfm.compression.downlink import DOWN_BYTES
    from fedfm.federation import MAX_STEPS
    from fedfm.pipeline import generator

    from fedfm.adapters.ranks import RANK

    payload = {**plan.algorithm.client_payload(state.opt_state), **plan.pipeline.client_payload(state.extra)}
    caps = caps or {}
    down_bytes = plan.downlink.nbytes(state.params) if plan.downlink is not None else 0  # same layout for all
    tasks = []
    for c in cohort:
        rank = plan.pipeline.rank_of(c)
        pruned = state.extra.get(REPORTED_RANKS, {}).get(str(c))  # HetLoRA: the rank it pruned itself to
        if pruned is not None:
            rank = int(pruned) if rank is None else min(rank, int(pruned))
        own = {**({MAX_STEPS: caps[c]} if c in caps else {}), **({RANK: rank} if rank is not None else {})}
        catch_up = flora_catch_up(state.extra, c)
        if catch_up:
            own["extra_bytes_down"] = catch_up
        params = state.params
        if plan.downlink is not None:  # the client trains from its replica, corrected by a compressed message
            own[DOWN_BYTES] = down_bytes
            if send:
                _, params = plan.downlink.send(c, state.params, generator(plan.seed, rnd, c, 0xD0))
        tasks.append(ClientTask(round=rnd, client_id=c, params=params, seed=client_seed(plan.seed, rnd, c),
                                payload={**payload, **own} if own else payload))
    return tasks


def client_seed(seed: int, rnd: int, client: int) -> int:
    return int(np.random.default_rng([seed, rnd, client, 0x5EED]).integers(2**31 - 1))


def screen(results: Sequence[ClientResult], params: NamedTensors,
           max_norm: Optional[float] = None) -> tuple[list[ClientResult], list[dict]]:
    """Accept the results whose update can be aggregated; reject the others with the reason.
    Structure is checked per update; the norms of all well-formed updates are computed together,
    one stacked float64 reduction per parameter name (a cohort of small updates costs a few
    calls, not a few per client)."""
    reasons: dict[int, Optional[str]] = {}
    formed = []
    for i, r in enumerate(results):
        reasons[i] = r.error if r.update is None else check_structure(r.update, params)
        if reasons[i] is None:
            formed.append(i)
    for i, norm in zip(formed, _norms64([results[i].update.delta for i in formed], params)):  # type: ignore[union-attr]
        reasons[i] = check_values(results[i].update, norm, max_norm)  # type: ignore[arg-type]
    accepted, rejected = [], []
    for i, r in enumerate(results):
        if reasons[i] is None:
            accepted.append(r)
        else:
            rejected.append({"client": r.client_id, "reason": reasons[i]})
    return accepted, rejected


def _norms64(deltas: Sequence[NamedTensors], params: NamedTensors) -> list[float]:
    """Each delta's L2 norm in float64 (NaN or Inf iff some value is: float64 sums of float32
    squares cannot overflow), stacked per name when the cohort's tensors are small."""
    import torch

    if not deltas:
        return []
    floats = [k for k, v in params.items() if v.is_floating_point()]
    if len(deltas) == 1 or sum(params[k].numel() for k in floats) * len(deltas) > (1 << 24):
        return [l2_norm64(d) for d in deltas]
    sq = torch.zeros(len(deltas), dtype=torch.float64)
    for k in floats:  # at most 16M elements stacked (above), so at most a 128 MB float64 temporary
        stacked = torch.stack([d[k] for d in deltas]).reshape(len(deltas), -1)
        sq += torch.linalg.vector_norm(stacked, dim=1, dtype=torch.float64).square()
    return [math.sqrt(float(v)) for v in sq]


def check_update(update: ModelUpdate, params: NamedTensors, max_norm: Optional[float] = None) -> Optional[str]:
    """Why ``update`` cannot be aggregated against ``params``, or None if it can."""
    return check_structure(update, params) or check_values(update, l2_norm64(update.delta), max_norm)


def check_structure(update: ModelUpdate, params: NamedTensors) -> Optional[str]:
    """Names, shapes and dtypes of ``update`` against ``params``: why they differ, or None."""
    if list(update.delta) != list(params):
        missing = sorted(set(params) - set(update.delta))[:3]
        extra = sorted(set(update.delta) - set(params))[:3]
        return f"parameter names differ (missing {missing}, unexpected {extra})"
    for k, v in update.delta.items():
        if tuple(v.shape) != tuple(params[k].shape):
            return f"shape of {k} is {tuple(v.shape)}, expected {tuple(params[k].shape)}"
    for k, v in update.delta.items():
        if v.dtype != params[k].dtype:
            return f"dtype of {k} is {v.dtype}, expected {params[k].dtype}"
    return None


def check_values(update: ModelUpdate, norm: float, max_norm: Optional[float] = None) -> Optional[str]:
    """Values of a well-formed update, given its float64 L2 ``norm``: why they are unusable, or None."""
    if not math.isfinite(norm):
        return "update contains NaN or Inf"
    if max_norm is not None and norm > max_norm:
        return f"update norm {norm:.3g} exceeds the sanity bound {max_norm:g} (aggregator.reject_norm)"
    if not (update.weight > 0 and np.isfinite(update.weight)):
        return f"weight {update.weight} is not a positive finite number"
    return None


def _weighted_loss(results: Sequence[ClientResult]) -> float:
    pairs = [(r.metrics["train_loss"], r.update.num_examples) for r in results if r.update is not None]
    total = sum(n for _, n in pairs)
    return float(sum(l * n for l, n in pairs) / total) if total else float("nan")
