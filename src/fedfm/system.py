"""System heterogeneity of federated clients, simulated: speed, availability, deadlines, async.

Real federations mix fast and slow devices that are not always reachable. This module
gives each simulated client a compute *speed*, a per-round *availability* probability and
optionally a *tier* (a class of device with its own speed and, e.g., LoRA rank, as in
HetLoRA, Cho et al. 2024, "Heterogeneous LoRA for Federated Fine-tuning of On-Device
Foundation Models"), then answers the two questions a round loop asks:

* synchronous rounds with a deadline (FedAvg, McMahan et al. 2017, drops clients that
  miss it; FedProx, Li et al. 2020, "Federated Optimization in Heterogeneous Networks",
  keeps their partial work): ``plan_deadline``;
* buffered asynchronous aggregation (FedBuff, Nguyen et al. 2022, "Federated Learning
  with Buffered Asynchronous Aggregation"): ``AsyncSchedule`` and ``staleness_weight``.

Time is *simulated*: a client of speed ``s`` needs ``step_s / s`` simulated seconds per
local step, plus ``bytes / bandwidth`` per transfer when a bandwidth is set. Nothing here
measures real time, reads files or touches the global RNG: every draw comes from
``np.random.default_rng([seed, key..., purpose])``, so a run resumed from a checkpoint
draws exactly what the uninterrupted run drew. State that must survive a checkpoint is
plain JSON (``to_json`` / ``from_json``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Optional, Sequence, Union

import numpy as np

from fedfm.errors import ConfigError

__all__ = [
    "ClientTier", "assign_tiers", "SystemProfile", "DeadlinePlan", "plan_deadline",
    "staleness_weight", "Arrival", "AsyncSchedule",
]

# Purpose constants: the last element of every RNG key, so streams never coincide.
_TIERS = 0x5E71E2
_AVAILABLE = 0x5EA7A1
_DISPATCH = 0x5ED15A

# Slack for float error: 8 s / 4 s per step is 2 steps, not 1.9999999999999998.
_EPS = 1e-9

Stragglers = Literal["drop", "partial"]
StalenessKind = Literal["polynomial", "constant", "hinge"]


# ---------------------------------------------------------------------------- tiers

@dataclass(frozen=True)
class ClientTier:
    """A class of client devices.

    Attributes:
        share: fraction of clients in this tier (all tiers' shares sum to 1).
        speed: relative compute speed (1.0 = takes ``step_s`` per local step).
        rank: LoRA rank this tier trains (HetLoRA, Cho et al. 2024); None = the model's.
    """

    share: float
    speed: float
    rank: Optional[int] = None

    def __post_init__(self) -> None:
        if self.rank is not None and (isinstance(self.rank, bool) or int(self.rank) != self.rank or self.rank < 1):
            raise ConfigError(f"tier rank must be a positive integer or None, got {self.rank!r}")

    def to_json(self) -> dict:
        return {"share": float(self.share), "speed": float(self.speed), "rank": self.rank}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "ClientTier":
        rank = data.get("rank")
        return cls(share=float(data["share"]), speed=float(data["speed"]),
                   rank=None if rank is None else int(rank))


def _tier_counts(num_clients: int, shares: Sequence[float]) -> list[int]:
    """Clients per tier by the largest remainder (Hamilton) method; sums to num_clients."""
    quotas = [s * num_clients for s in shares]
    counts = [math.floor(q + _EPS) for q in quotas]
    # rounded so float noise (2.9999999999999996) does not decide ties; ties -> lower index
    remainders = [round(q - c, 9) for q, c in zip(quotas, counts)]
    for i in sorted(range(len(shares)), key=lambda i: (-remainders[i], i))[:num_clients - sum(counts)]:
        counts[i] += 1
    return counts


def assign_tiers(num_clients: int, shares: Sequence[float], seed: int) -> np.ndarray:
    """Tier index (into ``shares``) of each client.

    Tier ``k`` gets ``floor(shares[k] * num_clients)`` clients, and the clients left over
    go one each to the tiers with the largest remainders (ties to the earlier tier), so the
    counts sum to ``num_clients`` exactly. Which clients land in which tier is a
    permutation drawn from ``default_rng([seed, purpose])``.

    Raises:
        ConfigError: num_clients < 1, a share not positive, or shares not summing to 1.
    """
    _check_num_clients(num_clients)
    shares = [float(s) for s in shares]
    if not shares:
        raise ConfigError("tier shares are empty: give at least one tier")
    bad = [s for s in shares if not (math.isfinite(s) and s > 0)]
    if bad:
        raise ConfigError(f"tier shares must be positive, got {shares} (bad: {bad})")
    if abs(sum(shares) - 1.0) > 1e-6:
        raise ConfigError(f"tier shares must sum to 1, got {shares} (sum {sum(shares):.9g})")
    labels = np.repeat(np.arange(len(shares)), _tier_counts(num_clients, shares))
    perm = np.random.default_rng([seed, _TIERS]).permutation(num_clients)
    tier = np.empty(num_clients, dtype=np.int64)
    tier[perm] = labels
    return tier


# ---------------------------------------------------------------------------- profile

@dataclass(frozen=True, eq=False)
class SystemProfile:
    """Speed, availability and tier of every client; build it with ``SystemProfile.build``.

    Attributes:
        num_clients: number of clients (ids 0..num_clients-1).
        seed: keys the availability draws (and, via ``build``, the tier assignment).
        speed: per-client relative speed, float64, read-only.
        availability: per-client probability of being reachable in a round, read-only.
        step_s: simulated seconds of one local step at speed 1.0.
        bandwidth: bytes per simulated second, each of upload and download; None = free.
        tier: per-client tier index (read-only), or None without tiers.
        tiers: the tiers, or None.
    """

    num_clients: int
    seed: int
    speed: np.ndarray
    availability: np.ndarray
    step_s: float = 1.0
    bandwidth: Optional[float] = None
    tier: Optional[np.ndarray] = None
    tiers: Optional[tuple[ClientTier, ...]] = None

    def __post_init__(self) -> None:
        n = self.num_clients
        _check_num_clients(n)
        for name, dtype in (("speed", np.float64), ("availability", np.float64), ("tier", np.int64)):
            value = getattr(self, name)
            if value is None:
                continue
            arr = np.array(value, dtype=dtype)
            if arr.shape != (n,):
                raise ConfigError(f"system {name} has {arr.size} entries but num_clients is {n}")
            arr.setflags(write=False)
            object.__setattr__(self, name, arr)
        if not np.all(np.isfinite(self.speed) & (self.speed > 0)):
            raise ConfigError(f"client speeds must be positive, got {self.speed.tolist()}")
        if not np.all((self.availability >= 0) & (self.availability <= 1)):
            raise ConfigError(f"client availability must be in [0, 1], got {self.availability.tolist()}")
        if not (math.isfinite(self.step_s) and self.step_s > 0):
            raise ConfigError(f"step_s must be positive, got {self.step_s}")
        if self.bandwidth is not None and not (math.isfinite(self.bandwidth) and self.bandwidth > 0):
            raise ConfigError(f"bandwidth must be positive bytes/s or None, got {self.bandwidth}")
        if (self.tier is None) != (self.tiers is None):
            raise ConfigError("tier and tiers must be given together")
        if self.tiers is not None:
            object.__setattr__(self, "tiers", tuple(self.tiers))
            if self.tier.size and (self.tier.min() < 0 or self.tier.max() >= len(self.tiers)):
                raise ConfigError(f"tier indices must be in [0, {len(self.tiers)}), got {self.tier.tolist()}")

    @classmethod
    def build(cls, num_clients: int, seed: int, speed: Union[float, Sequence[float], str],
              availability: Union[float, Sequence[float]], step_s: float = 1.0,
              bandwidth: Optional[float] = None,
              tiers: Optional[Sequence[ClientTier]] = None) -> "SystemProfile":
        """A profile from config values.

        Args:
            speed: one float for every client, a list with one float per client, or
                ``"tiers"`` for each client's tier speed (needs ``tiers``).
            availability: one probability in (0, 1] for every client, or a list with one
                probability in [0, 1] per client: the chance the client is reachable in a
                given round (drawn independently per client and round).
            step_s: simulated seconds one local step takes at speed 1.0.
            bandwidth: bytes per simulated second for each of upload and download;
                None = communication takes no simulated time.
            tiers: device tiers; clients are assigned by ``assign_tiers(num_clients,
                shares, seed)``.

        Raises:
            ConfigError: naming the bad value (and both lengths for a length mismatch).
        """
        _check_num_clients(num_clients)
        tier = tier_list = None
        if tiers is not None:
            tier_list = tuple(tiers)
            tier = assign_tiers(num_clients, [t.share for t in tier_list], seed)
        if isinstance(speed, str):
            if speed != "tiers":
                raise ConfigError(f"speed must be a number, a per-client list or 'tiers', got {speed!r}")
            if tier_list is None:
                raise ConfigError("speed = 'tiers' needs tiers (each with a share and a speed)")
            speeds = np.array([tier_list[k].speed for k in tier], dtype=np.float64)
        else:
            speeds = _per_client("speed", speed, num_clients)
        if not np.all(np.isfinite(speeds) & (speeds > 0)):
            raise ConfigError(f"client speeds must be positive, got {speeds.tolist()}")
        if np.ndim(availability) == 0 and not (0 < float(availability) <= 1):
            raise ConfigError(f"availability must be in (0, 1], got {availability}")
        avail = _per_client("availability", availability, num_clients)
        return cls(num_clients=num_clients, seed=int(seed), speed=speeds, availability=avail,
                   step_s=float(step_s), bandwidth=None if bandwidth is None else float(bandwidth),
                   tier=tier, tiers=tier_list)

    # ---- time

    def step_time(self, client: int) -> float:
        """Simulated seconds one local step takes on ``client``: step_s / speed."""
        return self.step_s / float(self.speed[self._check_client(client)])

    def transfer_time(self, num_bytes: float) -> float:
        """Simulated seconds to move ``num_bytes`` one way (0 without a bandwidth)."""
        if num_bytes < 0:
            raise ValueError(f"bytes must be >= 0, got {num_bytes}")
        return 0.0 if self.bandwidth is None else float(num_bytes) / self.bandwidth

    def client_time(self, client: int, steps: int, bytes_down: float = 0, bytes_up: float = 0) -> float:
        """Simulated seconds for download + ``steps`` local steps + upload on ``client``."""
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        return steps * self.step_time(client) + self.transfer_time(bytes_down) + self.transfer_time(bytes_up)

    # ---- availability and tiers

    def available(self, rnd: int, clients: Sequence[int]) -> list[int]:
        """The clients of ``clients`` reachable in round ``rnd``, in the given order.

        Each client is reachable independently with its ``availability``. One uniform draw
        per client id comes from ``default_rng([seed, rnd, purpose])``, so a client's fate
        in a round does not depend on which other clients are asked about.
        """
        if rnd < 0:
            raise ValueError(f"round key must be >= 0, got {rnd}")
        u = np.random.default_rng([self.seed, int(rnd), _AVAILABLE]).random(self.num_clients)
        return [int(c) for c in clients if u[self._check_client(c)] < self.availability[c]]

    def rank_of(self, client: int) -> Optional[int]:
        """The LoRA rank of the client's tier; None without tiers or if the tier sets none."""
        c = self._check_client(client)
        return None if self.tiers is None else self.tiers[int(self.tier[c])].rank

    # ---- checkpoint

    def to_json(self) -> dict:
        return {
            "num_clients": self.num_clients, "seed": self.seed,
            "speed": self.speed.tolist(), "availability": self.availability.tolist(),
            "step_s": self.step_s, "bandwidth": self.bandwidth,
            "tier": None if self.tier is None else self.tier.tolist(),
            "tiers": None if self.tiers is None else [t.to_json() for t in self.tiers],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "SystemProfile":
        tiers = data.get("tiers")
        return cls(num_clients=int(data["num_clients"]), seed=int(data["seed"]),
                   speed=data["speed"], availability=data["availability"],
                   step_s=float(data["step_s"]), bandwidth=data.get("bandwidth"),
                   tier=data.get("tier"),
                   tiers=None if tiers is None else tuple(ClientTier.from_json(t) for t in tiers))

    def _check_client(self, client: int) -> int:
        c = int(client)
        if not 0 <= c < self.num_clients:
            raise ValueError(f"client {client} out of range [0, {self.num_clients})")
        return c


# ---------------------------------------------------------------------------- deadlines

@dataclass(frozen=True)
class DeadlinePlan:
    """Who runs how many local steps in a synchronous round with a deadline.

    Attributes:
        steps: client -> local steps it runs (participating clients only, cohort order).
        dropped: client -> why it does not take part.
        round_time: simulated seconds the round takes.
    """

    steps: dict[int, int]
    dropped: dict[int, str]
    round_time: float


def plan_deadline(profile: SystemProfile, cohort: Sequence[int],
                  planned_steps: Union[int, Mapping[int, int]], deadline: Optional[float],
                  stragglers: Stragglers, bytes_down: Union[float, Mapping[int, float]] = 0,
                  bytes_up: Union[float, Mapping[int, float]] = 0) -> DeadlinePlan:
    """Which clients of ``cohort`` finish by ``deadline``, and the round's simulated time.

    Client ``c`` can complete ``k = floor((deadline - transfer) / step_time(c))`` steps
    (clamped to [0, planned]; a 1e-9 slack keeps exact multiples), where ``transfer`` is
    the time to download ``bytes_down`` plus to upload the ``bytes_up`` estimate (the
    reply's size is not known in advance; the default 0 leaves only the download). A
    client that can complete all its planned steps participates fully. Otherwise it is a
    straggler: ``"drop"`` drops it, as FedAvg's deadline does (McMahan et al. 2017;
    Bonawitz et al. 2019, "Towards Federated Learning at Scale"); ``"partial"`` keeps its
    ``k`` steps of partial work, as FedProx does (Li et al. 2020), and drops it only if
    ``k = 0``.

    ``round_time`` is the deadline if any client was cut short or dropped (the server
    waited until the deadline), else the longest ``client_time`` of the participants.
    With ``deadline=None`` nobody is cut. An empty cohort takes 0 s.

    Raises:
        ConfigError: bad ``stragglers`` or a non-positive deadline.
        ValueError: a duplicate client, negative steps, or a client missing from
            ``planned_steps``.
    """
    if stragglers not in ("drop", "partial"):
        raise ConfigError(f"stragglers must be 'drop' or 'partial', got {stragglers!r}")
    if deadline is not None and not (deadline > 0):
        raise ConfigError(f"deadline must be positive seconds or None, got {deadline}")
    if len(set(cohort)) != len(cohort):
        raise ValueError(f"cohort has duplicate clients: {list(cohort)}")
    def _bytes(b: Union[float, Mapping[int, float]], c: int) -> float:
        return float(b[c]) if isinstance(b, Mapping) else float(b)

    steps: dict[int, int] = {}
    dropped: dict[int, str] = {}
    cut = False
    for c in cohort:
        c = int(c)
        n = _planned(planned_steps, c)
        step = profile.step_time(c)
        transfer = profile.transfer_time(_bytes(bytes_down, c)) + profile.transfer_time(_bytes(bytes_up, c))
        if deadline is None:
            k = n
        else:
            budget = deadline - transfer
            if budget < -_EPS * max(1.0, deadline):
                k = -1  # cannot even move the model in time
            else:
                k = min(n, max(0, math.floor(max(budget, 0.0) / step + _EPS)))
        if k == n:
            steps[c] = n
            continue
        cut = True
        if k < 0:
            dropped[c] = (f"straggler: transfers alone take {transfer:g}s, more than the "
                          f"{deadline:g}s deadline")
        elif stragglers == "drop" or k == 0:
            dropped[c] = (f"straggler: would finish {k} of {n} steps by the {deadline:g}s deadline "
                          f"({step:g}s per step, {transfer:g}s transfers)")
        else:
            steps[c] = k
    if cut:
        round_time = float(deadline)
    else:
        round_time = max((profile.client_time(c, k, _bytes(bytes_down, c), _bytes(bytes_up, c))
                          for c, k in steps.items()), default=0.0)
    return DeadlinePlan(steps=steps, dropped=dropped, round_time=round_time)


# ---------------------------------------------------------------------------- async (FedBuff)

def staleness_weight(staleness: int, kind: StalenessKind = "polynomial", a: float = 0.5, b: int = 10) -> float:
    """Down-weighting of an update computed ``staleness`` server versions ago.

    * ``"polynomial"``: ``(1 + staleness) ** -a``; ``a = 0.5`` is FedBuff's
      ``1 / sqrt(1 + staleness)`` (Nguyen et al. 2022), from FedAsync's polynomial
      function (Xie et al. 2019, "Asynchronous Federated Optimization").
    * ``"constant"``: 1 (no down-weighting).
    * ``"hinge"``: 1 if ``staleness <= b`` else ``1 / (a * (staleness - b) + 1)``
      (FedAsync's hinge function, Xie et al. 2019).

    Raises:
        ValueError: negative or non-integer staleness, unknown kind, a < 0, b < 0.
    """
    if isinstance(staleness, bool) or int(staleness) != staleness or staleness < 0:
        raise ValueError(f"staleness must be a non-negative integer, got {staleness!r}")
    if not (math.isfinite(a) and a >= 0):
        raise ValueError(f"staleness weight exponent/slope a must be >= 0, got {a}")
    tau = int(staleness)
    if kind == "polynomial":
        return float((1.0 + tau) ** (-a))
    if kind == "constant":
        return 1.0
    if kind == "hinge":
        if b < 0:
            raise ValueError(f"hinge threshold b must be >= 0, got {b}")
        return 1.0 if tau <= b else 1.0 / (a * (tau - b) + 1.0)
    raise ValueError(f"staleness weight kind must be 'polynomial', 'constant' or 'hinge', got {kind!r}")


@dataclass(frozen=True)
class Arrival:
    """A client update reaching the server in ``AsyncSchedule.next_buffer``.

    Attributes:
        client: client id.
        version: server model version the client started from.
        staleness: server version at aggregation minus ``version``.
        start: simulated time the client was dispatched.
        finish: simulated time its update arrived.
        steps: local steps it ran.
    """

    client: int
    version: int
    staleness: int
    start: float
    finish: float
    steps: int


@dataclass
class AsyncSchedule:
    """Event-driven simulation of buffered asynchronous FL (FedBuff, Nguyen et al. 2022).

    Up to ``concurrency`` clients train at once, each on the model version current when it
    was dispatched. The server aggregates whenever ``buffer_size`` updates have arrived,
    which bumps ``version``; an update's staleness is the number of aggregations since it
    started. The caller's loop is::

        sched = AsyncSchedule.start(profile, concurrency, seed)
        while ...:
            sched.dispatch(sched.version, steps)       # top up to `concurrency` clients
            arrivals = sched.next_buffer(buffer_size)  # advance the clock; version += 1
            # train arrivals from their `version`, weight by staleness_weight(a.staleness)

    **Dispatch happens only after an aggregation** (and at the start), at the
    aggregation's time, with the new version. FedBuff's server instead refills a slot the
    moment a client reports, with the then-current model. For ``buffer_size = 1`` the two
    are identical. For ``buffer_size = K > 1`` a slot freed by an early member of a buffer
    here stays empty until the buffer is aggregated, so replacements start later (the
    clock runs slower, fewer clients are in flight between aggregations) and from the
    model one version newer (their staleness tends to be lower by up to one). Keep
    ``concurrency >= buffer_size``, as FedBuff does, or ``next_buffer`` cannot fill a buffer.

    The finish time is fixed at dispatch: ``clock + profile.client_time(client, steps,
    bytes_down, bytes_up)``. All state is JSON-able; ``from_json(to_json())`` continues
    exactly as the uninterrupted schedule would.

    Attributes:
        profile: the clients' speeds and availability.
        concurrency: number of clients kept in flight.
        seed: keys the choice of clients at dispatch.
        clock: simulated seconds since start (time of the last aggregation).
        version: server model version = aggregations so far.
        dispatches: number of ``dispatch`` calls so far (keys the availability draws).
        inflight: ``{"client", "version", "start", "finish", "steps"}`` per training client.
    """

    profile: SystemProfile
    concurrency: int
    seed: int
    clock: float = 0.0
    version: int = 0
    dispatches: int = 0
    inflight: list[dict] = field(default_factory=list)

    @classmethod
    def start(cls, profile: SystemProfile, concurrency: int, seed: int) -> "AsyncSchedule":
        """A schedule at time 0, version 0, with nobody in flight."""
        if isinstance(concurrency, bool) or int(concurrency) != concurrency or concurrency < 1:
            raise ConfigError(f"async concurrency must be a positive integer, got {concurrency!r}")
        return cls(profile=profile, concurrency=int(concurrency), seed=int(seed))

    def dispatch(self, rnd_key: int, steps: Union[int, Mapping[int, int]],
                 exclude: Union[set[int], frozenset[int], Sequence[int]] = frozenset(),
                 bytes_down: float = 0, bytes_up: float = 0) -> list[int]:
        """Top the in-flight set up to ``concurrency``; returns the new clients, sorted.

        Candidates are the clients reachable at this dispatch
        (``profile.available(dispatches, ...)``, one availability draw per call), not in
        flight and not in ``exclude``. As many as there are free slots are chosen uniformly
        without replacement from ``default_rng([seed, rnd_key, dispatches, purpose])``
        (``rnd_key``: any non-negative int the caller can reproduce, e.g. ``version``).
        Each starts now, from the current version, and will finish at ``clock +
        profile.client_time(client, steps, bytes_down, bytes_up)``; ``steps`` is one count
        for everyone or a mapping with each candidate's count. If nobody is reachable, call
        again: each call draws availability afresh.
        """
        if rnd_key < 0:
            raise ValueError(f"rnd_key must be >= 0, got {rnd_key}")
        key = self.dispatches
        self.dispatches += 1
        free = self.concurrency - len(self.inflight)
        if free <= 0:
            return []
        busy = {e["client"] for e in self.inflight} | {int(c) for c in exclude}
        candidates = [c for c in self.profile.available(key, range(self.profile.num_clients)) if c not in busy]
        rng = np.random.default_rng([self.seed, int(rnd_key), key, _DISPATCH])
        picked = rng.choice(len(candidates), size=min(free, len(candidates)), replace=False)
        chosen = sorted(candidates[int(i)] for i in picked)
        for c in chosen:
            n = _planned(steps, c)
            self.inflight.append({
                "client": c, "version": self.version, "start": self.clock,
                "finish": self.clock + self.profile.client_time(c, n, bytes_down, bytes_up), "steps": n,
            })
        return chosen

    def next_buffer(self, buffer_size: int) -> list[Arrival]:
        """The ``buffer_size`` earliest updates to arrive (ties by client id), in order.

        Removes them from the in-flight set, advances ``clock`` to the last one's finish
        time and bumps ``version`` by one (the aggregation). Staleness is measured against
        the version before the bump.

        Raises:
            ValueError: buffer_size < 1, or fewer than buffer_size clients in flight.
        """
        if isinstance(buffer_size, bool) or int(buffer_size) != buffer_size or buffer_size < 1:
            raise ValueError(f"buffer_size must be a positive integer, got {buffer_size!r}")
        if len(self.inflight) < buffer_size:
            raise ValueError(
                f"cannot fill a buffer of {buffer_size} updates: only {len(self.inflight)} clients in "
                f"flight (concurrency {self.concurrency}); dispatch more clients first, and keep "
                f"concurrency >= buffer_size")
        order = sorted(self.inflight, key=lambda e: (e["finish"], e["client"]))
        taken, self.inflight = order[:buffer_size], order[buffer_size:]
        arrivals = [Arrival(client=e["client"], version=e["version"], staleness=self.version - e["version"],
                            start=e["start"], finish=e["finish"], steps=e["steps"]) for e in taken]
        self.clock = max(self.clock, taken[-1]["finish"])
        self.version += 1
        return arrivals

    def to_json(self) -> dict:
        return {
            "profile": self.profile.to_json(), "concurrency": self.concurrency, "seed": self.seed,
            "clock": self.clock, "version": self.version, "dispatches": self.dispatches,
            "inflight": [dict(e) for e in self.inflight],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "AsyncSchedule":
        inflight = [{"client": int(e["client"]), "version": int(e["version"]), "start": float(e["start"]),
                     "finish": float(e["finish"]), "steps": int(e["steps"])} for e in data["inflight"]]
        return cls(profile=SystemProfile.from_json(data["profile"]), concurrency=int(data["concurrency"]),
                   seed=int(data["seed"]), clock=float(data["clock"]), version=int(data["version"]),
                   dispatches=int(data["dispatches"]), inflight=inflight)


# ---------------------------------------------------------------------------- helpers

def _check_num_clients(num_clients: int) -> None:
    if isinstance(num_clients, bool) or int(num_clients) != num_clients or num_clients < 1:
        raise ConfigError(f"num_clients must be a positive integer, got {num_clients!r}")


def _per_client(name: str, value: Union[float, Sequence[float]], num_clients: int) -> np.ndarray:
    if np.ndim(value) == 0:
        return np.full(num_clients, float(value))
    arr = np.asarray(value, dtype=np.float64)
    if arr.shape != (num_clients,):
        raise ConfigError(f"{name} lists {arr.size} values but there are {num_clients} clients")
    return arr


def _planned(planned: Union[int, Mapping[int, int]], client: int) -> int:
    if isinstance(planned, Mapping):
        if client not in planned:
            raise ValueError(f"no planned step count for client {client}")
        n = planned[client]
    else:
        n = planned
    if int(n) != n or n < 0:
        raise ValueError(f"planned steps must be a non-negative integer, got {n!r} for client {client}")
    return int(n)
