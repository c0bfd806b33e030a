"""Differential privacy for federated updates: Gaussian mechanisms and dp_accounting bookkeeping.

Mechanisms (:mod:`fedfm.privacy.mechanisms`) clip and noise updates and say what each step costs
as a ``dp_accounting`` DpEvent; :class:`Accountant` (:mod:`fedfm.privacy.accounting`) turns the
composed events into epsilon with dp_accounting's RDP or PLD accountant. fedfm does no accountant
math of its own. The neighbouring relation is add/remove one client (user-level DP).

How the config keys map onto this package (m = clients per round, N = clients, q = m / N,
T = rounds, ``gen`` = the round's torch.Generator):

- ``privacy.mechanism = "none"``: nothing here runs; report epsilon as infinite or omit it.
- ``privacy.mechanism = "central"`` (DP-FedAvg, McMahan et al. 2018):
    z = ``privacy.noise_multiplier``, or, if ``privacy.target_epsilon`` is set,
    ``calibrate_noise(target_epsilon, privacy.delta, T, q, privacy.accountant)`` once at start.
    ``mech = CentralGaussian(noise_multiplier=z, cohort_size=m)``;
    ``clip_state = privacy.clip`` or, with ``privacy.adaptive_clip``,
    ``AdaptiveClip.recommended(privacy.clip, m)`` (checkpoint it: ``dataclasses.asdict``).
    Each round:
      1. send ``C = clip_state.clip`` (or the float) to clients; each sends
         ``clipped, norm = clip(delta, C)`` (the norm only to drive adaptive clipping);
      2. ``agg = mech.aggregate([clipped...], clip_state, gen)`` (fixed denominator m);
      3. adaptive only: ``clip_state = clip_state.update([norm...], m, gen)``;
      4. ``accountant = accountant.compose(mech.event(q))``: exactly one event per round, also
         for adaptive clipping (its count noise is already inside z).
- ``privacy.mechanism = "local"``: ``mech = LocalGaussian(privacy.clip, z)``; each client sends
    ``mech.privatize(delta, client_gen)[0]``; the server aggregates as usual (post-processing).
    Accounting is per client: for every round a client takes part in, compose ``mech.event()``
    into that client's ledger (equivalently ``Accountant(kind).compose(mech.event(), k)`` for
    k participations); report the maximum over clients.
- ``privacy.mechanism = "dpsgd"``: not in this package yet (per-example clipping in the trainer).
- ``privacy.accountant``: ``Accountant("rdp")`` or ``Accountant("pld")``; epsilon after round r
    is ``accountant.epsilon(privacy.delta)``, or ``epsilon_per_round`` for a planned run.

Bad values raise ValueError naming the value and what is allowed.
"""

from fedfm.privacy.accounting import (
    ACCOUNTANT_KINDS,
    Accountant,
    calibrate_noise,
    epsilon_after,
    epsilon_per_round,
    round_event,
    sampling_rate,
)
from fedfm.privacy.mechanisms import (
    AdaptiveClip,
    CentralGaussian,
    ClipState,
    LocalGaussian,
    add_noise,
    clip,
    effective_noise_multiplier,
    gaussian_noise_like,
    global_norm,
)

__all__ = [
    "ACCOUNTANT_KINDS",
    "Accountant",
    "AdaptiveClip",
    "CentralGaussian",
    "ClipState",
    "LocalGaussian",
    "add_noise",
    "calibrate_noise",
    "clip",
    "effective_noise_multiplier",
    "epsilon_after",
    "epsilon_per_round",
    "gaussian_noise_like",
    "global_norm",
    "round_event",
    "sampling_rate",
]
