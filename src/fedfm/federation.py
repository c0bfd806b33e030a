"""System heterogeneity in the round loop: who shows up, how much work counts, how long it takes.

Built from ``[clients]`` and ``[federation]`` (fedfm.system holds the model of speeds, availability,
deadlines and the asynchronous schedule); used by fedfm.round.

Synchronous rounds (``federation.mode = "sync"``)::

    cohort (sampled as always) -> unreachable clients drop out (clients.availability)
        -> deadline: clients that cannot finish their local steps in time are dropped, or run the
           steps they can (federation.stragglers = "partial"; task.payload["max_steps"])
        -> the round lasts max(client times), or the deadline if someone was cut

Buffered asynchronous aggregation (``federation.mode = "async"``, FedBuff, Nguyen et al. 2022)::

    keep `concurrency` clients in flight, each training on the model of the moment it started;
    every `buffer` arrivals:  x <- x + server_step( (1/K) sum_i s(staleness_i) delta_i )

In simulation a client trains when it is dispatched (on the params of that version, which is what
it would see) and its update is held until its simulated finish time; updates in flight are part
of the server state (``opt_state["inflight/<client>/<name>"]``) so a checkpoint keeps them.

Simulated time (``ServerState.extra["sim_time"]``, reported as ``sim_time_s``) is the clock of
this model: local steps at each client's speed plus transfers at ``clients.bandwidth``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Sequence

import numpy as np

from fedfm.system import AsyncSchedule, ClientTier, DeadlinePlan, SystemProfile, plan_deadline, staleness_weight

if TYPE_CHECKING:
    import torch

    from fedfm.config import ExperimentConfig
    from fedfm.round import RoundPlan
    from fedfm.types import ClientResult, NamedTensors, RoundReport, ServerState

SIM_TIME = "sim_time"
"""ServerState.extra key of the simulated clock (seconds)."""
ASYNC = "async"
"""ServerState.extra key of the asynchronous schedule (fedfm.system.AsyncSchedule.to_json)."""
INFLIGHT = "inflight/"
"""opt_state prefix of the updates in flight (async): inflight/<client>/<param name>."""
MAX_STEPS = "max_steps"
"""ClientTask.payload key: this round's cap on the client's local steps (partial work)."""


@dataclass(frozen=True)
class SystemPlan:
    """Attributes:
        profile: speeds, availability and tiers of all clients.
        planned_steps: client id -> local steps a full round of local training takes.
        deadline, stragglers: see FederationConfig.
        mode: "sync" or "async".
        buffer, concurrency, staleness, staleness_exponent: FedBuff's settings (async).
    """

    profile: SystemProfile
    planned_steps: Mapping[int, int]
    deadline: Optional[float] = None
    stragglers: str = "drop"
    mode: str = "sync"
    buffer: int = 1
    concurrency: int = 1
    staleness: str = "polynomial"
    staleness_exponent: float = 0.5


def build_system(cfg: "ExperimentConfig", sizes: Sequence[int]) -> SystemPlan:
    """The system model of ``cfg`` for clients holding ``sizes`` training examples."""
    c, f = cfg.clients, cfg.federation
    tiers = [ClientTier(t.share, t.speed, t.rank) for t in c.tiers] if c.tiers else None
    profile = SystemProfile.build(f.clients, cfg.seed, c.speed, c.availability, c.step_s, c.bandwidth, tiers)
    return SystemPlan(profile=profile, planned_steps={i: planned_steps(cfg, n) for i, n in enumerate(sizes)},
                      deadline=f.deadline, stragglers=f.stragglers, mode=f.mode, buffer=f.buffer_size,
                      concurrency=f.in_flight, staleness=f.staleness, staleness_exponent=f.staleness_exponent)


def planned_steps(cfg: "ExperimentConfig", n: int) -> int:
    """Local steps LocalTrainer runs on ``n`` examples: epochs of ceil(n / batch) steps, capped;
    plus FedRep's head steps or Ditto's personal steps (compute the client spends too)."""
    per_epoch = math.ceil(n / cfg.client.batch_size) if n else 0
    steps = cfg.client.epochs * per_epoch
    steps = steps if cfg.client.max_steps is None else min(steps, cfg.client.max_steps)
    p = cfg.personalization
    if p.method == "fedrep":
        steps += p.head_steps
    elif p.method == "ditto":
        steps += p.personal_steps if p.personal_steps is not None else steps
    return steps


@dataclass(frozen=True)
class Participation:
    """Who trains this round and how much: ``steps`` caps (only for partial stragglers),
    ``dropped`` (report entries with the reason) and the round's simulated duration."""

    clients: list[int]
    caps: dict[int, int]
    dropped: list[dict[str, Any]]
    round_time: float


def participation(system: SystemPlan, rnd: int, cohort: Sequence[int],
                  bytes_down: "int | Mapping[int, int]", bytes_up: "int | Mapping[int, int] | None" = None
                  ) -> Participation:
    """Apply availability and the deadline to a sampled cohort (synchronous rounds). ``bytes_down``:
    what each client downloads; ``bytes_up``: an estimate of its reply (default: the same; the
    reply's real size, after compression, is known only once it is sent)."""
    reachable = system.profile.available(rnd, cohort)
    present = set(reachable)
    gone = [{"client": c, "reason": "unavailable: dropped out of the round (clients.availability)"}
            for c in cohort if c not in present]
    plan: DeadlinePlan = plan_deadline(system.profile, reachable, {c: system.planned_steps[c] for c in reachable},
                                       system.deadline, system.stragglers, bytes_down=bytes_down,
                                       bytes_up=bytes_down if bytes_up is None else bytes_up)
    late = [{"client": c, "reason": why if why.startswith("straggler") else f"straggler: {why}"} for c, why in sorted(plan.dropped.items())]
    clients = [c for c in reachable if c in plan.steps]
    caps = {c: plan.steps[c] for c in clients if plan.steps[c] < system.planned_steps[c]}
    return Participation(clients=clients, caps=caps, dropped=gone + late, round_time=plan.round_time)


def sim_time(extra: Mapping[str, Any]) -> float:
    return float(extra.get(SIM_TIME, 0.0))


# ---------------------------------------------------------------------- asynchronous (FedBuff)

def run_async_round(state: "ServerState", plan: "RoundPlan", on_result: Optional[Callable] = None
                    ) -> "tuple[ServerState, RoundReport]":
    """One server step of buffered asynchronous aggregation: top up the clients in flight, wait
    (in simulated time) for ``buffer`` arrivals, apply their staleness-weighted mean."""
    import time

    import torch

    from fedfm import wire
    from fedfm.round import make_tasks, screen
    from fedfm.types import ModelUpdate, RoundReport, ServerState

    if plan.downlink is not None:  # the config refuses it too; a plan built in code must not slip by
        raise ValueError("downlink compression runs with synchronous rounds; federation.mode = \"async\" "
                         "sends clients tasks that stay in flight across server steps")

    start = time.perf_counter()
    system = plan.system
    assert system is not None and system.mode == "async"
    extra, opt_state = dict(state.extra), dict(state.opt_state)
    sched = (AsyncSchedule.from_json(extra[ASYNC]) if ASYNC in extra
             else AsyncSchedule.start(system.profile, system.concurrency, plan.seed))
    bytes_down = wire.encoded_size(state.params)
    # 1. top up: new clients train now, on this version's params; their updates wait for their finish time
    new: list[int] = []
    for _ in range(10_000):  # availability is redrawn per dispatch; stop once a buffer can fill
        new += sched.dispatch(sched.version, system.planned_steps, bytes_down=bytes_down, bytes_up=bytes_down)
        if len(sched.inflight) >= system.buffer:
            break
    else:
        raise RuntimeError(f"async: fewer than {system.buffer} clients became available in 10,000 draws "
                           "(clients.availability is too low for federation.buffer)")
    rnd = state.round + 1
    down = up = 0
    rejected: list[dict[str, Any]] = []
    losses: list[tuple[float, int]] = []
    received: list[Any] = []
    if new:
        tasks = make_tasks(state, rnd, sorted(new), plan)
        results = plan.runtime.run(tasks, on_result)
        received = [plan.pipeline.receive(r, state.params) for r in results]
        accepted, bad = screen(received, state.params, plan.max_update_norm)
        rejected += bad
        down, up = sum(r.bytes_down for r in results), sum(r.bytes_up for r in results)
        for r in accepted:
            for k, v in r.update.delta.items():
                opt_state[f"{INFLIGHT}{r.client_id}/{k}"] = v
            extra.setdefault("inflight_meta", {})[str(r.client_id)] = {
                "weight": r.update.weight, "num_examples": r.update.num_examples,
                "train_loss": float(r.metrics.get("train_loss", float("nan")))}
    # 2. the next `buffer` arrivals, in simulated time
    arrivals = sched.next_buffer(system.buffer)
    meta = dict(extra.get("inflight_meta", {}))
    updates, weights, stale = [], [], []
    for a in arrivals:
        prefix = f"{INFLIGHT}{a.client}/"
        delta = {k[len(prefix):]: opt_state.pop(k) for k in [k for k in opt_state if k.startswith(prefix)]}
        info = meta.pop(str(a.client), None)
        stale.append(a.staleness)
        if not delta or info is None:
            continue  # its update was rejected when it was trained (reported then)
        updates.append(ModelUpdate(delta=delta, weight=info["weight"], num_examples=info["num_examples"]))
        weights.append(staleness_weight(a.staleness, system.staleness, system.staleness_exponent))
        losses.append((info["train_loss"], info["num_examples"]))
    extra["inflight_meta"] = meta
    # 3. FedBuff's step: (1/K) sum_i s(tau_i) delta_i, then the algorithm's server update
    params = dict(state.params)
    algo_state = {k: v for k, v in opt_state.items() if not k.startswith(INFLIGHT)}
    held = {k: v for k, v in opt_state.items() if k.startswith(INFLIGHT)}
    if updates:
        delta = {k: sum(w * u.delta[k] for w, u in zip(weights, updates)) / system.buffer for k in state.params}
        params, algo_state = plan.algorithm.server_update(state.params, algo_state, delta)
    extra[ASYNC] = sched.to_json()
    extra[SIM_TIME] = sched.clock
    extra, epsilon = plan.pipeline.account(extra, sorted(new), received)  # charged when a client trains
    total = sum(n for _, n in losses)
    report = RoundReport(
        round=rnd, clients=tuple(a.client for a in arrivals),
        train_loss=float(sum(l * n for l, n in losses) / total) if total else float("nan"),
        bytes_up=up, bytes_down=down, rejected=tuple(rejected), wall_s=time.perf_counter() - start,
        epsilon=epsilon, delta=plan.pipeline.delta if epsilon is not None else None,
        sim_time=sched.clock, staleness=tuple(stale))
    return ServerState(round=rnd, params=params, opt_state={**algo_state, **held}, extra=extra), report
