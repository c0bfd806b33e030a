"""Phases of a Federated Foundation Model run and the policies that switch between them.

A run is a sequence of *stages*. A stage is either ``central`` (the server trains the
global trainable params on public data for ``central_steps`` steps) or ``federated``
(one round over private client data). Consecutive stages of one kind form a *phase*.
After each stage the run records a validation loss and the stage's compute (training
examples processed), and a ``SwitchPolicy`` picks the next stage from that history.

Policies are pure functions of the history: no hidden state, so a resumed run makes
exactly the decisions the uninterrupted run made.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Optional, Protocol, Sequence

from fedfm.errors import ConfigError
from fedfm.registry import Registry

if TYPE_CHECKING:
    from fedfm.config import ExperimentConfig

Kind = Literal["central", "federated"]
KINDS: tuple[Kind, ...] = ("central", "federated")


@dataclass(frozen=True)
class Stage:
    """What happened in one finished stage.

    Attributes:
        kind: central or federated.
        val_loss: validation loss after the stage (lower is better); None if not measured.
        cost: training examples processed in the stage (server or clients).
    """

    kind: Kind
    val_loss: Optional[float]
    cost: float


@dataclass(frozen=True)
class Decision:
    """The next stage (None = stop) and why."""

    kind: Optional[Kind]
    reason: str


@dataclass(frozen=True)
class Budget:
    """Limits on the whole run; None = unlimited. A run stops at the first limit reached."""

    stages: Optional[int] = None
    federated_rounds: Optional[int] = None
    compute: Optional[float] = None

    def exhausted(self, history: Sequence[Stage]) -> Optional[str]:
        if self.stages is not None and len(history) >= self.stages:
            return f"budget of {self.stages} stages reached"
        rounds = sum(1 for s in history if s.kind == "federated")
        if self.federated_rounds is not None and rounds >= self.federated_rounds:
            return f"budget of {self.federated_rounds} federated rounds reached"
        spent = sum(s.cost for s in history)
        if self.compute is not None and spent >= self.compute:
            return f"compute budget of {self.compute:.0f} examples reached ({spent:.0f} spent)"
        return None


class SwitchPolicy(Protocol):
    def next_stage(self, history: Sequence[Stage], initial_loss: Optional[float] = None) -> Decision:
        """The kind of the next stage given every finished stage and the validation loss
        before any training (the budget is checked by the caller)."""
        ...


POLICIES: Registry[type] = Registry("schedule policy")


def current_phase(history: Sequence[Stage]) -> list[Stage]:
    """The trailing run of stages of the same kind."""
    if not history:
        return []
    kind, n = history[-1].kind, 0
    while n < len(history) and history[-1 - n].kind == kind:
        n += 1
    return list(history[-n:])


def hold(history: Sequence[Stage], start: Kind, min_phase: int) -> Optional[Decision]:
    """The decision forced before any rule applies: the first stage, or staying in a phase
    shorter than ``min_phase``; None when the policy's own rule decides."""
    if not history:
        return Decision(start, "start")
    phase = current_phase(history)
    if len(phase) < min_phase:
        return Decision(phase[-1].kind, f"minimum phase length {min_phase} not reached")
    return None


def other(kind: Kind) -> Kind:
    return "federated" if kind == "central" else "central"


@POLICIES.register("fixed")
@dataclass(frozen=True)
class FixedPolicy:
    """A repeating pattern of phases, e.g. 1 central stage then 5 federated rounds.

    Args:
        phases: (kind, stages) pairs, cycled until the budget ends the run.
    """

    phases: tuple[tuple[Kind, int], ...]

    def __post_init__(self) -> None:
        if not self.phases or any(n < 1 or k not in KINDS for k, n in self.phases):
            raise ConfigError(f"fixed schedule needs phases of (central|federated, stages >= 1); got {self.phases}")

    def next_stage(self, history: Sequence[Stage], initial_loss: Optional[float] = None) -> Decision:
        period = sum(n for _, n in self.phases)
        pos = len(history) % period
        for kind, n in self.phases:
            if pos < n:
                return Decision(kind, f"fixed pattern position {pos + 1}/{period}")
            pos -= n
        raise AssertionError("unreachable")


@POLICIES.register("adaptive")
@dataclass(frozen=True)
class AdaptivePolicy:
    """Switch when the current phase stops improving the validation loss.

    After at least ``min_phase`` stages in a phase, the improvement over the last
    ``window`` evaluations is ``loss[-1-window] - loss[-1]``. When it stays below
    ``threshold`` for ``patience`` consecutive evaluations, the policy switches.
    The seed FFM paper (Yu et al. 2023) calls for such switching but leaves the rule open;
    this is the plain plateau rule, made precise.
    """

    start: Kind = "central"
    threshold: float = 0.01
    window: int = 2
    patience: int = 1
    min_phase: int = 1

    def next_stage(self, history: Sequence[Stage], initial_loss: Optional[float] = None) -> Decision:
        held = hold(history, self.start, self.min_phase)
        if held is not None:
            return held
        kind = history[-1].kind
        strikes, last_imp = self._strikes(current_phase(history))
        if strikes >= self.patience:
            return Decision(other(kind), f"{kind} improvement {last_imp:.4g} over last {self.window} evals "
                                         f"< threshold {self.threshold} for {strikes} evals")
        return Decision(kind, "still improving" if last_imp is not None else "not enough evaluations")

    def _strikes(self, phase: Sequence[Stage]) -> tuple[int, Optional[float]]:
        losses = [s.val_loss for s in phase if s.val_loss is not None]
        strikes, last = 0, None
        for end in range(len(losses) - 1, self.window - 1, -1):
            imp = losses[end - self.window] - losses[end]
            last = imp if last is None else last
            if imp >= self.threshold:
                break
            strikes += 1
        return strikes, last


@POLICIES.register("bandit")
@dataclass(frozen=True)
class BanditPolicy:
    """fedfm's own policy: a sliding-window UCB bandit over {central, federated}.

    Rationale: the plateau rule only asks "has this phase stalled?", never "would the
    other phase help more, per unit of compute?". Central steps on public data are
    cheap and never touch clients; a federated round costs many client steps and
    communication. The bandit scores each arm by its recent validation-loss decrease
    *per training example* (reward = (loss_before - loss_after) / cost, normalized
    by the mean stage cost), averaged over its last ``window`` plays, plus an
    exploration bonus ``c * sqrt(2 ln t / n)`` that re-tries an arm whose estimate
    is stale (the value of public data changes as the model learns). It commits to
    a phase for at least ``min_phase`` stages to avoid thrashing, and plays each arm
    once before trusting any estimate.
    """

    start: Kind = "central"
    window: int = 3
    c: float = 0.5
    min_phase: int = 1

    def next_stage(self, history: Sequence[Stage], initial_loss: Optional[float] = None) -> Decision:
        held = hold(history, self.start, self.min_phase)
        if held is not None:
            return held
        rewards = self._rewards(history, initial_loss)
        for kind in KINDS:
            if not rewards[kind]:
                return Decision(kind, f"exploring {kind} (never played with a measured reward)")
        t = sum(len(r) for r in rewards.values())
        scores = {k: _mean(r[-self.window:]) + self.c * math.sqrt(2 * math.log(t) / len(r)) for k, r in rewards.items()}
        best = max(KINDS, key=lambda k: (scores[k], k == history[-1].kind))
        detail = ", ".join(f"{k} {scores[k]:.4g}" for k in KINDS)
        return Decision(best, f"UCB scores: {detail}")

    @staticmethod
    def _rewards(history: Sequence[Stage], initial_loss: Optional[float]) -> dict[Kind, list[float]]:
        costs = [s.cost for s in history if s.cost > 0]
        unit = _mean(costs) if costs else 1.0
        rewards: dict[Kind, list[float]] = {k: [] for k in KINDS}
        prev = initial_loss
        for s in history:
            if s.val_loss is not None:
                if prev is not None and s.cost > 0:
                    rewards[s.kind].append((prev - s.val_loss) / (s.cost / unit))
                prev = s.val_loss
        return rewards


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def decide(
    policy: SwitchPolicy, budget: Budget, history: Sequence[Stage], initial_loss: Optional[float] = None
) -> Decision:
    """The next stage, or a stop when the budget is exhausted."""
    why = budget.exhausted(history)
    if why is not None:
        return Decision(None, why)
    return policy.next_stage(history, initial_loss)


def build_schedule(cfg: "ExperimentConfig") -> tuple[SwitchPolicy, Budget]:
    """The policy and budget a config asks for. With no central phase this is plain FL:
    ``federation.rounds`` federated rounds."""
    s = cfg.schedule
    budget = Budget(stages=s.budget_rounds, federated_rounds=cfg.federation.rounds, compute=s.budget_compute)
    if cfg.paradigm in ("central", "pooled"):
        if s.budget_rounds is None and s.budget_compute is None:
            raise ConfigError(f"paradigm={cfg.paradigm!r} has no federated rounds to stop it; "
                              "set schedule.budget_rounds or schedule.budget_compute")
        return FixedPolicy((("central", 1),)), budget
    if s.central_steps == 0 or cfg.paradigm == "fl":
        return FixedPolicy((("federated", 1),)), budget
    if s.policy == "fixed":
        central, fed = ("central", s.central_stages), ("federated", s.rounds_per_phase)
        return FixedPolicy((central, fed) if s.start == "central" else (fed, central)), budget
    if s.policy == "adaptive":
        return AdaptivePolicy(start=s.start, threshold=s.threshold, window=s.window, patience=s.patience,
                              min_phase=s.min_phase), budget
    return BanditPolicy(start=s.start, window=s.window, c=s.exploration, min_phase=s.min_phase), budget
