"""Privacy accounting: DpEvents in, (epsilon, delta) out, all computed by ``dp_accounting``.

fedfm writes no accountant math: it builds ``dp_accounting`` events and hands them to its RDP
(Mironov 2017, "Renyi differential privacy") or PLD (Doroshenko et al. 2022, "Connect the dots:
tighter discrete approximations of privacy loss distributions") accountant, under the add/remove-
one-client neighbouring relation (user-level DP).

Client sampling. fedfm samples a fixed-size cohort of m of N clients per round, but accounts for
it as Poisson sampling with q = m / N (``PoissonSampledDpEvent``): the common approximation
(McMahan et al. 2018). The exact event for fixed-size sampling, ``SampledWithoutReplacementDpEvent``,
is not usable here: in dp_accounting 0.6.0 the PLD accountant does not support it at all, and the
RDP accountant supports it only under the replace-one relation, which is a different (and not
comparable) guarantee from the add/remove one used for every other event.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable, Literal

if TYPE_CHECKING:
    import dp_accounting

AccountantKind = Literal["rdp", "pld"]
ACCOUNTANT_KINDS: tuple[str, ...] = ("rdp", "pld")

PLD_DISCRETIZATION = 1e-3
"""PLD value discretization: 10x coarser than dp_accounting's default, 10x faster, and still a
pessimistic (upper-bound) estimate; the epsilons differ by ~1e-5 relative at typical settings."""

_MIN_NOISE_MULTIPLIER = 0.01  # calibration searches no lower (eps would be astronomically large)


def _check_kind(kind: str) -> None:
    if kind not in ACCOUNTANT_KINDS:
        raise ValueError(f"accountant must be one of {', '.join(map(repr, ACCOUNTANT_KINDS))}; got {kind!r}")


def _check_delta(delta: float) -> None:
    if not (isinstance(delta, (int, float)) and 0 < delta < 1):
        raise ValueError(f"delta must be in the open interval (0, 1); got {delta!r}")


def _check_sampling_rate(q: float) -> None:
    if not (isinstance(q, (int, float)) and 0 < q <= 1):
        raise ValueError(f"sampling_rate must be in (0, 1] (clients per round / clients); got {q!r}")


def _check_rounds(rounds: int) -> None:
    if not (isinstance(rounds, int) and rounds >= 1):
        raise ValueError(f"rounds must be an integer >= 1; got {rounds!r}")


def sampling_rate(cohort_size: int, population: int) -> float:
    """q = m / N for m clients sampled per round out of N.

    Raises:
        ValueError: unless 1 <= cohort_size <= population.
    """
    ints = isinstance(cohort_size, int) and isinstance(population, int)
    if not (ints and 1 <= cohort_size <= population):
        raise ValueError(
            f"need 1 <= cohort_size <= population; got cohort_size={cohort_size!r}, population={population!r}"
        )
    return cohort_size / population


def round_event(noise_multiplier: float, sampling_rate: float) -> "dp_accounting.DpEvent":
    """The DpEvent of one DP-FedAvg round: a Gaussian with multiplier z on a Poisson(q) sample.

    ``PoissonSampledDpEvent(q, GaussianDpEvent(z))``, simplified to ``GaussianDpEvent(z)`` when
    q = 1 (no sampling) and to ``NonPrivateDpEvent`` when z = 0 (epsilon is infinite).

    Raises:
        ValueError: if z < 0 or q is outside (0, 1].
    """
    import dp_accounting

    z = noise_multiplier
    if not (isinstance(z, (int, float)) and math.isfinite(z) and z >= 0):
        raise ValueError(f"noise_multiplier must be a finite number >= 0; got {z!r}")
    _check_sampling_rate(sampling_rate)
    if noise_multiplier == 0:
        return dp_accounting.NonPrivateDpEvent()
    gaussian = dp_accounting.GaussianDpEvent(float(noise_multiplier))
    if sampling_rate == 1:
        return gaussian
    return dp_accounting.PoissonSampledDpEvent(float(sampling_rate), gaussian)


@dataclass(frozen=True)
class Accountant:
    """An immutable ledger of DpEvents and the (epsilon, delta) it amounts to.

    ``compose`` returns a new Accountant; the ledger (run-length encoded: (event, count) pairs)
    is the whole state, so it can be checkpointed. ``epsilon`` replays the ledger into a fresh
    dp_accounting accountant each call.

    Attributes:
        kind: "rdp" (``dp_accounting.rdp.RdpAccountant``) or "pld"
            (``dp_accounting.pld.PLDAccountant``, tighter, slower).
        ledger: the composed events with their repeat counts, in order.
        pld_discretization: value discretization interval of the PLD accountant.
    """

    kind: AccountantKind = "rdp"
    ledger: "tuple[tuple[dp_accounting.DpEvent, int], ...]" = ()
    pld_discretization: float = PLD_DISCRETIZATION

    def __post_init__(self) -> None:
        _check_kind(self.kind)
        if not self.pld_discretization > 0:
            raise ValueError(f"pld_discretization must be > 0; got {self.pld_discretization!r}")

    def fresh(self) -> "dp_accounting.PrivacyAccountant":
        """A new, empty dp_accounting accountant of this kind."""
        import dp_accounting

        if self.kind == "rdp":
            return dp_accounting.rdp.RdpAccountant()
        return dp_accounting.pld.PLDAccountant(value_discretization_interval=self.pld_discretization)

    def compose(self, event: "dp_accounting.DpEvent", count: int = 1) -> "Accountant":
        """This ledger followed by ``event`` repeated ``count`` times.

        Raises:
            ValueError: if ``count`` < 1 or this accountant kind does not support ``event``.
        """
        if not (isinstance(count, int) and count >= 1):
            raise ValueError(f"count must be an integer >= 1; got {count!r}")
        if not self.fresh().supports(event):
            raise ValueError(f"the {self.kind!r} accountant does not support {event!r}")
        if self.ledger and self.ledger[-1][0] == event:
            last, n = self.ledger[-1]
            return replace(self, ledger=self.ledger[:-1] + ((last, n + count),))
        return replace(self, ledger=self.ledger + ((event, count),))

    def epsilon(self, delta: float) -> float:
        """The epsilon of everything composed so far at ``delta`` (0 for an empty ledger).

        Raises:
            ValueError: if delta is not in (0, 1).
        """
        _check_delta(delta)
        if not self.ledger:
            return 0.0
        acc = self.fresh()
        for event, count in self.ledger:
            acc.compose(event, count)
        return float(acc.get_epsilon(delta))


def epsilon_after(
    rounds: int,
    noise_multiplier: float,
    sampling_rate: float,
    delta: float,
    accountant: AccountantKind = "rdp",
) -> float:
    """Epsilon at ``delta`` after ``rounds`` DP-FedAvg rounds of :func:`round_event`."""
    _check_rounds(rounds)
    event = round_event(noise_multiplier, sampling_rate)
    return Accountant(accountant).compose(event, rounds).epsilon(delta)


def epsilon_per_round(
    rounds: int,
    noise_multiplier: float,
    sampling_rate: float,
    delta: float,
    accountant: AccountantKind = "rdp",
) -> list[float]:
    """[epsilon after round 1, ..., epsilon after round ``rounds``] (for metrics.jsonl)."""
    _check_rounds(rounds)
    z, q = noise_multiplier, sampling_rate
    return [epsilon_after(r, z, q, delta, accountant) for r in range(1, rounds + 1)]


def _bracket(eps: Callable[[float], float], target: float) -> tuple[float, float]:
    """(lo, hi) with eps(lo) > target >= eps(hi) and hi = 2 lo, searched from z = 1 by doubling or
    halving; lo is 0 when even z < 0.01 meets the target."""
    hi = 1.0
    for _ in range(60):
        if eps(hi) <= target:
            break
        hi *= 2
    else:
        raise ValueError(f"no noise multiplier up to {hi:.3g} reaches target_epsilon={target}")
    lo = hi / 2
    while eps(lo) <= target:
        if lo < _MIN_NOISE_MULTIPLIER:
            return 0.0, lo
        hi, lo = lo, lo / 2
    return lo, hi


def calibrate_noise(
    target_epsilon: float,
    delta: float,
    rounds: int,
    sampling_rate: float,
    accountant: AccountantKind = "rdp",
    *,
    pld_discretization: float = PLD_DISCRETIZATION,
) -> float:
    """The smallest noise multiplier z meeting (target_epsilon, delta) after ``rounds`` rounds.

    The root is found by ``dp_accounting.calibrate_dp_mechanism`` (tolerance 1e-6 relative in z)
    on a bracket we search first; the result is then recomputed and, should it overshoot the
    target, stepped up until it does not. No z below 0.01 is searched: a target that even such
    a z meets gets one (meeting it, but not the smallest).

    Args:
        target_epsilon: the epsilon budget for the whole run (> 0).
        delta: the delta of the guarantee, in (0, 1).
        rounds: number of rounds (each one :func:`round_event`).
        sampling_rate: q = clients per round / clients.
        accountant: "rdp" or "pld".
        pld_discretization: PLD value discretization interval.

    Returns:
        z such that epsilon_after(rounds, z, q, delta) <= target_epsilon.

    Raises:
        ValueError: on a bad argument (naming the allowed values).
    """
    import dp_accounting

    target = target_epsilon
    if not (isinstance(target, (int, float)) and math.isfinite(target) and target > 0):
        raise ValueError(f"target_epsilon must be a finite number > 0; got {target!r}")
    _check_delta(delta)
    _check_rounds(rounds)
    _check_sampling_rate(sampling_rate)
    base = Accountant(accountant, pld_discretization=pld_discretization)

    def event(z: float) -> "dp_accounting.DpEvent":
        return dp_accounting.SelfComposedDpEvent(round_event(z, sampling_rate), rounds)

    def eps(z: float) -> float:
        return base.compose(event(z)).epsilon(delta)

    lo, hi = _bracket(eps, target_epsilon)
    if lo == 0.0:
        return hi
    tol = 1e-6 * hi
    z = float(
        dp_accounting.calibrate_dp_mechanism(
            base.fresh, event, target_epsilon, delta, dp_accounting.ExplicitBracketInterval(lo, hi), tol=tol
        )
    )
    return _never_overshoot(eps, target_epsilon, z, tol)


def _never_overshoot(eps: Callable[[float], float], target: float, z: float, tol: float) -> float:
    step = tol
    for _ in range(60):
        if eps(z) <= target:
            return z
        z, step = z + step, step * 2
    raise RuntimeError(f"calibration overshot target_epsilon={target} at z={z}")  # pragma: no cover
