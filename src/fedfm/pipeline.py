"""The update pipeline: what happens to a client's delta between local training and the server step.

One :class:`UpdatePipeline`, built from the config by :func:`build_pipeline`, holds both sides and
is the same object on every runtime (the Flower ClientApp builds it from the config text).

Client side (:meth:`UpdatePipeline.client_step`, called by `fedfm.runtime.client.train_client`)::

    delta -> clip to this round's C -> local Gaussian noise (local DP) -> compress -> wire payload

C travels in ``ClientTask.payload["clip"]``, because adaptive clipping changes it every round.
Noise can only follow clipping: local noise is LocalGaussian's clip-then-noise, central noise is
added to a mean of clipped updates, and the config has no noise without one of those two. The
compressor's per-client state (the error-feedback residual) goes in and comes back out; the
runtime keeps it. Under central DP clients report whether they clipped (``metrics["clipped"]``, what
adaptive clipping counts), never the norm; under local DP nothing derived from the norm is sent.

Server side (:func:`fedfm.round.run_round`)::

    receive     check_payload -> decode -> dense ModelUpdate (then the round screens NaN, shapes)
    aggregate   central DP              CentralGaussian: re-clip, uniform mean over the fixed
                                        denominator m = clients_per_round, Gaussian noise
                secure aggregation      SecAgg over the accepted updates (weights scaled into
                                        (0, 1], sent in the clear), weighted mean of the survivors
                central DP + SecAgg     secure sum of the clipped updates / m, then the server
                                        adds the noise (it cannot re-clip what it cannot see)
                otherwise               the configured aggregator
    account     the round's DpEvent into an Accountant rebuilt from ``ServerState.extra``

Secure aggregation in simulation (the in-process runtime, and Flower runs, which use the same
server code): the SecAgg protocol runs *in the server process* over the updates it received,
with real X25519 keys, ChaCha20 masks, Shamir shares and dropout recovery, the ``secagg.dropout``
fraction of the cohort vanishing after masking. The result is numerically what a deployment
computes. The privacy property itself needs the masking done at the clients, which a Flower
deployment would get from Flower's SecAgg+ mod; that is not wired here.

Randomness: every draw comes from its own torch.Generator, keyed by the task's seed on the
client (noise, stochastic rounding) and by (seed, round) on the server (central noise, adaptive
clip, secure aggregation, simulated dropouts), never from a global RNG: runs are reproducible and
every runtime computes the same model.

State: ``ServerState.extra`` (JSON) holds the adaptive clip (``dataclasses.asdict``), the count of
private rounds (central) or each client's participation count (local). Every round composes the
same DpEvent, so the accountant's ledger is rebuilt from those counts.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

import numpy as np
import torch

from fedfm.adapters.ranks import RANK, pad_delta, truncate
from fedfm.compression import Compressor, Identity, build_compressor, check_payload
from fedfm.privacy import (Accountant, AdaptiveClip, CentralGaussian, ClipState, LocalGaussian, add_noise, clip,
                           round_event)
from fedfm.tensors import all_finite
from fedfm.types import ClientResult, ClientTask, ModelUpdate, NamedTensors

if TYPE_CHECKING:
    from fedfm.aggregators.base import Aggregator
    from fedfm.config import ExperimentConfig
    from fedfm.secagg import AggregateResult, SecAggConfig

log = logging.getLogger("fedfm.pipeline")

CLIP_KEY = "clip"
"""ClientTask.payload key of this round's clip norm."""

# purposes of the generators, so no two draws ever share a stream (append new ones: the values seed runs)
_CLIENT_NOISE, _CLIENT_CODEC, _SERVER_NOISE, _ADAPTIVE, _SECAGG, _DROPOUT = range(6)


def generator(*key: int) -> torch.Generator:
    """A CPU torch.Generator seeded from the non-negative integers ``key``."""
    seed = int(np.random.default_rng([*key, 0xF1FE]).integers(2**63 - 1))
    return torch.Generator().manual_seed(seed)


@dataclass(frozen=True)
class ClientOutput:
    """What the client pipeline makes of a delta.

    Attributes:
        payload: the wire payload, or None when the client refuses to send (``error`` says why).
        state: the client's new pipeline state (error-feedback residual), None if stateless.
        metrics: pipeline metrics (``clipped``: 1.0 if the update was clipped).
        error: why nothing is sent.
    """

    payload: Optional[dict[str, torch.Tensor]]
    state: Optional[dict[str, torch.Tensor]]
    metrics: dict[str, float]
    error: Optional[str] = None


@dataclass(frozen=True)
class Aggregate:
    """The server side's combined delta (None if none could be formed), its new extra state, and
    the updates left out after screening (simulated dropouts), as report entries."""

    delta: Optional[dict[str, torch.Tensor]]
    extra: dict[str, Any]
    dropped: tuple[dict[str, Any], ...] = ()


@dataclass(frozen=True)
class UpdatePipeline:
    """Privacy, secure aggregation and compression of client updates (the default does nothing).

    Attributes:
        mechanism: "none", "central" (DP-FedAvg) or "local".
        clip: the clip norm C (the starting one with adaptive clipping).
        noise_multiplier: z (0 = no noise).
        adaptive: the initial adaptive-clip state (Andrew et al. 2021), None for a fixed clip.
        delta: the delta epsilon is reported at.
        accountant: "rdp" or "pld".
        secagg: the secure aggregation settings, None when off.
        dropout: fraction of the accepted updates dropped after masking (simulation).
        compressor: the uplink codec (Identity when off; wrapped in ErrorFeedback if configured).
        weighting: weights of the mean under secure aggregation ("examples" or "uniform").
        cohort_size: m, clients per round (the fixed denominator of central DP).
        population: N, clients.
        seed: the experiment seed.
    """

    mechanism: str = "none"
    clip: float = 1.0
    noise_multiplier: float = 0.0
    adaptive: Optional[AdaptiveClip] = None
    delta: float = 1e-5
    accountant: str = "rdp"
    secagg: Optional["SecAggConfig"] = None
    dropout: float = 0.0
    compressor: Compressor = field(default_factory=Identity)
    weighting: str = "examples"
    cohort_size: int = 1
    population: int = 1
    seed: int = 0
    ranks: Optional[tuple[int, ...]] = None
    """Each client's LoRA rank when they differ (fedfm.adapters.ranks): a client below the model's
    rank sends the first r components of its factors, which the server pads back."""
    model_rank: Optional[int] = None
    """The rank the model is built at (the largest any tier has, even one no client drew)."""

    @property
    def sampling_rate(self) -> float:
        return self.cohort_size / self.population

    def initial_extra(self) -> dict[str, Any]:
        """The server-side state before round 1 (JSON-able)."""
        extra: dict[str, Any] = {}
        if self.adaptive is not None:
            extra["adaptive_clip"] = asdict(self.adaptive)
        if self.mechanism == "central":
            extra["dp_rounds"] = 0
        if self.mechanism == "local":
            extra["participation"] = [0] * self.population
        return extra

    def rank_of(self, client: int) -> Optional[int]:
        """The client's LoRA rank if it is below the model's (its payloads are truncated), else None."""
        if self.ranks is None or not 0 <= client < len(self.ranks):
            return None
        r = self.ranks[client]
        return r if r < (self.model_rank or max(self.ranks)) else None

    def clip_state(self, extra: Mapping[str, Any]) -> ClipState:
        """This round's clip: the fixed norm, or the adaptive state kept in ``extra``."""
        if self.adaptive is None:
            return self.clip
        return AdaptiveClip(**extra.get("adaptive_clip", asdict(self.adaptive)))

    # ------------------------------------------------------------------ client side

    def client_payload(self, extra: Mapping[str, Any]) -> dict[str, float]:
        """What every task of the round carries for the pipeline: the clip norm, if clients clip."""
        if self.mechanism in ("none", "dpsgd"):  # DP-SGD clips per example inside the trainer
            return {}
        state = self.clip_state(extra)
        return {CLIP_KEY: state.clip if isinstance(state, AdaptiveClip) else float(state)}

    def client_step(self, delta: NamedTensors, task: ClientTask, state: Optional[NamedTensors]) -> ClientOutput:
        """Clip, noise and compress one client's delta for ``task``.

        Raises:
            ValueError: if clients must clip and the task carries no clip norm.
        """
        if not all_finite(delta):
            return ClientOutput(None, dict(state) if state else None, {}, "the trained update has NaN or Inf values")
        metrics: dict[str, float] = {}
        if RANK in task.payload:  # a lower-rank client sends only the components it holds
            delta = truncate(delta, int(task.payload[RANK]))
        if self.mechanism == "local":
            # nothing derived from the norm leaves the client: local DP does not trust the server
            delta, _ = LocalGaussian(_clip_of(task), self.noise_multiplier).privatize(
                delta, generator(task.seed, _CLIENT_NOISE))
        elif self.mechanism == "central":
            bound = _clip_of(task)
            delta, norm = clip(delta, bound)
            metrics["clipped"] = float(norm > bound)  # the trusted server's adaptive clip needs this bit
        if isinstance(self.compressor, Identity):  # nothing random to draw: skip seeding a generator
            payload, new_state = dict(delta), None
        else:
            payload, new_state = self.compressor.encode(delta, state, generator(task.seed, _CLIENT_CODEC))
        return ClientOutput(payload, new_state or None, metrics)

    # ------------------------------------------------------------------ server side

    def receive(self, result: ClientResult, like: NamedTensors) -> ClientResult:
        """``result`` with its payload decoded into a dense update, or with the reason it cannot be."""
        if result.payload is None:
            return result
        rank = self.rank_of(result.client_id)
        if "lora_rank" in result.metrics:  # a self-pruning client reports the rank it sent
            rank = int(result.metrics["lora_rank"])
        full = like
        if rank is not None:
            like = truncate(like, rank)
        reason = check_payload(self.compressor, result.payload, like)
        if reason is not None:
            return replace(result, error=f"malformed payload: {reason}")
        try:
            delta = self.compressor.decode(result.payload, like)
        except (IndexError, RuntimeError, ValueError) as e:
            return replace(result, error=f"malformed payload: it does not decode ({e})")
        if rank is not None:
            delta = pad_delta(delta, full, rank)
        n = float(result.metrics.get("num_examples", math.nan))
        update = ModelUpdate(delta=delta, weight=n, num_examples=int(n) if math.isfinite(n) else 0)
        return replace(result, update=update)

    def aggregate(
        self, accepted: Sequence[ClientResult], extra: Mapping[str, Any], rnd: int, aggregator: "Aggregator"
    ) -> Aggregate:
        """Combine the accepted (decoded, screened) results of round ``rnd`` into one delta."""
        if self.secagg is not None:
            return self._secure(accepted, extra, rnd)
        if self.mechanism == "central":
            return self._central(accepted, extra, rnd)
        return Aggregate(aggregator.aggregate([r.update for r in accepted if r.update is not None]), dict(extra))

    def account(self, extra: Mapping[str, Any], cohort: Sequence[int],
                results: Sequence[ClientResult] = ()) -> tuple[dict[str, Any], Optional[float]]:
        """Charge one federated round over ``cohort``: (new extra, epsilon so far), epsilon None
        without a mechanism. Central: every round is one Poisson-sampled Gaussian (a round in
        which no update arrived is charged too, conservatively). Local: each client sampled is
        charged one Gaussian; the reported epsilon is the worst client's."""
        new = dict(extra)
        if self.mechanism == "central":
            count = new["dp_rounds"] = int(new.get("dp_rounds", 0)) + 1
            event = CentralGaussian(self.noise_multiplier, self.cohort_size).event(self.sampling_rate)
        elif self.mechanism == "local":
            counts = list(new.get("participation", [0] * self.population))
            for c in cohort:
                counts[c] += 1
            new["participation"] = counts
            count, event = max(counts), LocalGaussian(self.clip, self.noise_multiplier).event()
        elif self.mechanism == "dpsgd":
            return self._account_dpsgd(new, results)
        else:
            return new, None
        return new, Accountant(self.accountant).compose(event, count).epsilon(self.delta)  # type: ignore[arg-type]

    def _account_dpsgd(self, extra: dict[str, Any], results: Sequence[ClientResult]) -> tuple[dict[str, Any], float]:
        """DP-SGD: each local step of client i is a Poisson-sampled Gaussian at its rate q_i (batch
        over its examples); a client's epsilon composes all the steps it has taken (sample-level
        DP of that client's data). Reported: the worst client's epsilon so far."""
        steps = {str(k): int(v) for k, v in extra.get("dpsgd_steps", {}).items()}
        rates = {str(k): float(v) for k, v in extra.get("dpsgd_rate", {}).items()}
        eps = {str(k): float(v) for k, v in extra.get("dpsgd_epsilon", {}).items()}
        for r in results:
            taken = int(r.metrics.get("steps", 0)) if r.payload is not None or r.update is not None else 0
            if taken == 0 or "dp_sample_rate" not in r.metrics:
                continue
            key = str(r.client_id)
            steps[key] = steps.get(key, 0) + taken
            rates[key] = float(r.metrics["dp_sample_rate"])
            event = round_event(self.noise_multiplier, rates[key])
            eps[key] = Accountant(self.accountant).compose(event, steps[key]).epsilon(self.delta)  # type: ignore[arg-type]
        extra.update(dpsgd_steps=steps, dpsgd_rate=rates, dpsgd_epsilon=eps)
        return extra, max(eps.values(), default=0.0)

    def _central(self, accepted: Sequence[ClientResult], extra: Mapping[str, Any], rnd: int) -> Aggregate:
        state, new = self.clip_state(extra), dict(extra)
        mech = CentralGaussian(self.noise_multiplier, self.cohort_size)
        deltas = [r.update.delta for r in accepted if r.update is not None]
        delta = mech.aggregate(deltas, state, generator(self.seed, rnd, _SERVER_NOISE))
        if isinstance(state, AdaptiveClip):
            # only 1[norm <= C] enters the update, and that bit is all a client reports
            norms = [math.inf if r.metrics.get("clipped", 1.0) else 0.0 for r in accepted]
            new["adaptive_clip"] = asdict(state.update(norms, self.cohort_size, generator(self.seed, rnd, _ADAPTIVE)))
        return Aggregate(delta, new)

    def _secure(self, accepted: Sequence[ClientResult], extra: Mapping[str, Any], rnd: int) -> Aggregate:
        from fedfm.secagg import SecAggError, flatten, unflatten

        assert self.secagg is not None
        updates = [r.update for r in accepted if r.update is not None]
        central = self.mechanism == "central"
        raw = [1.0 if central or self.weighting == "uniform" else u.weight for u in updates]
        # weights scaled into (0, 1] by the largest keep the encoding's full precision; they travel
        # in the clear, and the mean divides by the survivors' sum
        weights = [w / max(raw) for w in raw]
        flat = [flatten(u.delta) for u in updates]
        out = self._dropouts(len(updates), rnd)
        dropped = tuple({"client": accepted[i].client_id, "reason": "dropped after masking (secagg.dropout "
                         "simulation); its masks were removed by recovery"} for i in sorted(out))
        try:
            result = secure_weighted_sum([v for v, _ in flat], weights, out, self.secagg, _seed(self.seed, rnd))
        except SecAggError as e:
            log.warning("round %d: secure aggregation failed, no update this round: %s", rnd, e)
            return Aggregate(None, dict(extra), tuple({"client": r.client_id, "reason": f"secagg: {e}"}
                                                      for r in accepted))
        layout = flat[0][1]
        if not central:
            return Aggregate(unflatten(result.total / result.weight_sum, layout), dict(extra), dropped)
        # DP-FedAvg's noise on the fixed-denominator mean (CentralGaussian's std with a fixed clip)
        mean = unflatten(result.total / self.cohort_size, layout)
        std = self.noise_multiplier * self.clip / self.cohort_size
        return Aggregate(add_noise(mean, std, generator(self.seed, rnd, _SERVER_NOISE)), dict(extra), dropped)

    def _dropouts(self, n: int, rnd: int) -> frozenset[int]:
        """Indices of the ``dropout`` fraction of n accepted updates that vanish after masking."""
        k = math.floor(self.dropout * n + 1e-9)
        rng = np.random.default_rng([self.seed, rnd, _DROPOUT])
        return frozenset(int(i) for i in rng.choice(n, size=k, replace=False))


def _clip_of(task: ClientTask) -> float:
    if CLIP_KEY not in task.payload:
        raise ValueError(f"the pipeline clips updates but task of round {task.round} carries no "
                         f"payload[{CLIP_KEY!r}] (the server sends this round's clip norm)")
    return float(task.payload[CLIP_KEY])


def _seed(*key: int) -> int:
    return int(np.random.default_rng([*key, _SECAGG]).integers(2**62))


def secure_weighted_sum(
    vectors: Sequence[torch.Tensor], weights: Sequence[float], dropped: frozenset[int], config: "SecAggConfig",
    seed: int,
) -> "AggregateResult":
    """The SecAgg protocol among ``len(vectors)`` clients, step by step (see fedfm.secagg): client i
    masks ``weights[i] * vectors[i]``; the clients in ``dropped`` vanish after sharing their secrets,
    and the server recovers the survivors' sum. Keys, seeds and rounding derive from ``seed``.

    Raises:
        SecAggError: if too few clients survive to unmask.
    """
    from fedfm.secagg import SecAggClient, SecAggServer, SeededBytes, Session

    n = len(vectors)
    if config.neighbours is not None:
        config = replace(config, neighbours=_degree(config.neighbours, n))
    session, rng = Session.create(n, config, seed), SeededBytes(seed)
    clients = [SecAggClient.setup(i, session, rng) for i in range(n)]
    server = SecAggServer(session, {c.client_id: c.public_key for c in clients})
    inboxes = server.route_shares({c.client_id: c.share_secrets(rng) for c in clients})
    masked = {i: clients[i].mask(vectors[i], server.keys_for(i), generator=generator(seed, i), weight=weights[i])
              for i in range(n) if i not in dropped}
    request = server.request_unmasking(masked)
    responses = {i: clients[i].respond(request, inboxes[i]) for i in sorted(request.survivors)}
    return server.unmask(masked, responses)


def _degree(k: int, n: int) -> int:
    """SecAgg+'s k for n clients: at most n - 1, and even when n is odd (a k-regular graph)."""
    k = min(k, n - 1)
    if k % 2 and n % 2:
        k = k + 1 if k + 1 <= n - 1 else k - 1
    return max(k, 1)


# ---------------------------------------------------------------------- building from config


def build_pipeline(cfg: "ExperimentConfig", client_sizes: Optional[Sequence[int]] = None) -> UpdatePipeline:
    """The pipeline of ``cfg`` (its combinations were checked when the config loaded).

    Raises:
        ConfigError: if a calibrated noise multiplier is too large for adaptive clipping.
    """
    from fedfm.secagg import SecAggConfig

    p, sa, c, fed = cfg.privacy, cfg.secagg, cfg.compression, cfg.federation
    z = noise_multiplier(cfg, client_sizes)
    secagg = None
    if sa.enabled:
        secagg = SecAggConfig(bits=sa.bits, clip_range=sa.clip_range, max_dropout=sa.max_dropout,
                              neighbours=sa.neighbours)
    return UpdatePipeline(
        mechanism=p.mechanism, clip=p.clip, noise_multiplier=z, adaptive=_adaptive(cfg, z), delta=p.delta,
        accountant=p.accountant, secagg=secagg, dropout=sa.dropout if sa.enabled else 0.0,
        compressor=build_compressor(c.name, c.bits, c.fraction, c.rank, c.error_feedback),
        weighting=cfg.aggregator.weighting, cohort_size=fed.clients_per_round, population=fed.clients, seed=cfg.seed,
        ranks=_ranks(cfg), model_rank=cfg.adapter.max_rank(cfg.clients.tiers) if cfg.adapter.method == "lora" else None,
    )


def _ranks(cfg: "ExperimentConfig") -> Optional[tuple[int, ...]]:
    from fedfm.adapters.ranks import client_ranks

    ranks = client_ranks(cfg)
    return None if ranks is None else tuple(ranks)


def planned_rounds(cfg: "ExperimentConfig") -> int:
    """The most federated rounds the schedule can run (what a target epsilon is spread over)."""
    budget = cfg.schedule.budget_rounds
    return min(cfg.federation.rounds, budget) if budget is not None else cfg.federation.rounds


def noise_multiplier(cfg: "ExperimentConfig", client_sizes: Optional[Sequence[int]] = None) -> float:
    """z as configured, or calibrated once so the planned rounds end within privacy.target_epsilon.

    DP-SGD calibrates from the clients' sizes (``client_sizes``, needed then): the worst case is the
    smallest client (the largest sampling rate) taking part in every planned round."""
    from fedfm.privacy import calibrate_noise

    p, fed = cfg.privacy, cfg.federation
    if p.mechanism == "none":
        return 0.0
    if p.noise_multiplier is not None:
        return p.noise_multiplier
    assert p.target_epsilon is not None
    rounds = planned_rounds(cfg)
    if p.mechanism == "dpsgd":
        sizes = [n for n in (client_sizes or []) if n > 0]
        if not sizes:
            raise ValueError("calibrating DP-SGD's noise needs the clients' partition sizes")
        n, b, c = min(sizes), cfg.client.batch_size, cfg.client
        per_round = c.epochs * -(-n // b)
        steps = rounds * (min(per_round, c.max_steps) if c.max_steps is not None else per_round)
        z = calibrate_noise(p.target_epsilon, p.delta, steps, min(1.0, b / n), p.accountant)
        log.info("privacy: DP-SGD noise_multiplier z=%.6g meets target_epsilon=%g at delta=%g over %d steps "
                 "of the smallest client (%d examples)", z, p.target_epsilon, p.delta, steps, n)
        return z
    if p.mechanism == "central":
        z = calibrate_noise(p.target_epsilon, p.delta, rounds, fed.clients_per_round / fed.clients, p.accountant)
    else:
        # a client may take part in every round, each a Gaussian of multiplier z / 2 (LocalGaussian.event)
        z = 2 * calibrate_noise(p.target_epsilon, p.delta, rounds, 1.0, p.accountant)
    log.info("privacy: noise_multiplier z=%.6g meets target_epsilon=%g at delta=%g over %d rounds (%s)",
             z, p.target_epsilon, p.delta, rounds, p.mechanism)
    return z


def _adaptive(cfg: "ExperimentConfig", z: float) -> Optional[AdaptiveClip]:
    from fedfm.errors import ConfigError
    from fedfm.privacy import effective_noise_multiplier

    p, m = cfg.privacy, cfg.federation.clients_per_round
    if not p.adaptive_clip:
        return None
    state = AdaptiveClip(clip=p.clip, target_quantile=p.target_quantile, learning_rate=p.clip_lr,
                         count_noise_std=m / 20)
    try:
        effective_noise_multiplier(z, state.count_noise_std)
    except ValueError as e:
        raise ConfigError(f"privacy.adaptive_clip with the calibrated noise_multiplier={z:.4g}: {e}; "
                          "raise privacy.target_epsilon or the cohort, or use a fixed clip") from None
    return state
