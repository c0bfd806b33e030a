"""Gaussian mechanisms on federated updates: clipping, noise, DP-FedAvg, adaptive clip, local DP.

Every mechanism is a frozen dataclass: configuration and state go in, new values come out.
Randomness comes only from the ``torch.Generator`` passed in. The privacy cost of each step is a
``dp_accounting`` DpEvent (see :mod:`fedfm.privacy.accounting`); nothing here computes epsilon.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Sequence, Union

from fedfm.privacy.accounting import round_event

if TYPE_CHECKING:
    import dp_accounting
    import torch

    from fedfm.types import NamedTensors


def _check_clip(bound: float, name: str = "clip") -> None:
    if not (isinstance(bound, (int, float)) and math.isfinite(bound) and bound > 0):
        raise ValueError(f"{name} must be a finite number > 0; got {bound!r}")


def _check_noise_multiplier(z: float) -> None:
    if not (isinstance(z, (int, float)) and math.isfinite(z) and z >= 0):
        raise ValueError(f"noise_multiplier must be a finite number >= 0; got {z!r}")


def global_norm(delta: "NamedTensors") -> float:
    """L2 norm of all tensors together (as one flat vector), accumulated in float64."""
    import torch

    from fedfm.tensors import slices

    sq = 0.0
    for v in delta.values():
        for c in slices(v):  # a large tensor by slices: no float64 copy of the whole of it
            sq += float(torch.sum(c.to(torch.float64).square()))
    return math.sqrt(sq)


def clip(delta: "NamedTensors", bound: float) -> "tuple[dict[str, torch.Tensor], float]":
    """Scale ``delta`` by min(1, bound / ||delta||) so its global L2 norm is at most ``bound``.

    The scaled tensors are cast back to their dtype; the scale is shrunk by the dtype's rounding
    error so the clipped norm never exceeds ``bound`` after that cast.

    Args:
        delta: the update, name -> tensor.
        bound: the clip norm C (> 0).

    Returns:
        (clipped update, norm of the unclipped update). An update already within the bound is
        returned unchanged (same tensors).

    Raises:
        ValueError: if ``bound`` is not a finite number > 0 or ``delta`` is not finite.
    """
    import torch

    _check_clip(bound)
    norm = global_norm(delta)
    if not math.isfinite(norm):
        raise ValueError(f"cannot clip an update with non-finite values (norm {norm})")
    if norm <= bound:
        return dict(delta), norm
    eps = max((torch.finfo(v.dtype).eps for v in delta.values()), default=0.0)
    scale = bound / norm * (1.0 - eps)
    for _ in range(8):  # one pass suffices in practice; the loop guards against rounding surprises
        out = {k: (v.to(torch.float64) * scale).to(v.dtype) for k, v in delta.items()}
        if global_norm(out) <= bound:
            return out, norm
        scale *= 1.0 - max(eps, 2.0**-52) * 4
    raise AssertionError(f"clip failed to bring norm {norm} within {bound}")  # pragma: no cover


def gaussian_noise_like(
    delta: "NamedTensors", std: float, generator: "torch.Generator"
) -> "dict[str, torch.Tensor]":
    """I.i.d. N(0, std^2) noise with the names, shapes and dtypes of ``delta``.

    Sampled on the generator's device in float32 (float64 for float64 tensors), then moved and
    cast to each tensor's device and dtype.

    Raises:
        ValueError: if ``std`` is negative or not finite.
    """
    import torch

    if not (math.isfinite(std) and std >= 0):
        raise ValueError(f"noise std must be a finite number >= 0; got {std!r}")
    out = {}
    for k, v in delta.items():
        if std == 0:
            out[k] = torch.zeros_like(v)
            continue
        dt = torch.float64 if v.dtype == torch.float64 else torch.float32
        z = torch.randn(v.shape, generator=generator, dtype=dt, device=generator.device)
        out[k] = (z * std).to(device=v.device, dtype=v.dtype)
    return out


def add_noise(delta: "NamedTensors", std: float, generator: "torch.Generator") -> "dict[str, torch.Tensor]":
    """``delta`` plus i.i.d. N(0, std^2) noise on every coordinate."""
    noise = gaussian_noise_like(delta, std, generator)
    return {k: v + noise[k] for k, v in delta.items()}


def effective_noise_multiplier(noise_multiplier: float, count_noise_std: float) -> float:
    """Noise multiplier z_delta left for the update when the clipped-count is also noised.

    Andrew et al. 2021 ("Differentially private learning with adaptive clipping", Thm. 1): a
    round releasing the update with noise multiplier z_delta and the centred clipped-count with
    noise std sigma_b (sensitivity 1/2) is as private as one Gaussian mechanism with
    z = (z_delta^-2 + (2 sigma_b)^-2)^(-1/2). So, for a target z,
    z_delta = (z^-2 - (2 sigma_b)^-2)^(-1/2).

    Args:
        noise_multiplier: the overall z the accountant is charged for (>= 0; 0 = no privacy).
        count_noise_std: sigma_b, the std of the noise on the clipped-count sum.

    Returns:
        z_delta (>= z). 0 when ``noise_multiplier`` is 0.

    Raises:
        ValueError: if sigma_b <= z / 2 (the count alone would spend the whole budget).
    """
    _check_noise_multiplier(noise_multiplier)
    if not (math.isfinite(count_noise_std) and count_noise_std >= 0):
        raise ValueError(f"count_noise_std must be a finite number >= 0; got {count_noise_std!r}")
    if noise_multiplier == 0:
        return 0.0
    if 2 * count_noise_std <= noise_multiplier:
        raise ValueError(
            f"count_noise_std={count_noise_std} is too small for noise_multiplier={noise_multiplier}: "
            f"adaptive clipping needs count_noise_std > noise_multiplier / 2 = {noise_multiplier / 2} "
            "(Andrew et al. 2021 suggest cohort_size / 20)"
        )
    return float((noise_multiplier**-2 - (2 * count_noise_std) ** -2) ** -0.5)


@dataclass(frozen=True)
class AdaptiveClip:
    """Adaptive clip norm tracking a quantile of update norms (Andrew et al. 2021).

    Each round, with current clip C and m the (fixed, expected) cohort size:
    b_i = 1[norm_i <= C]; b_bar = (sum_i (b_i - 1/2) + N(0, sigma_b^2)) / m + 1/2;
    C <- C * exp(-eta_C * (b_bar - gamma)) (the paper's geometric update). With all m clients
    reporting, b_bar = (sum_i b_i + N(0, sigma_b^2)) / m; centring the bits halves the count's
    sensitivity, which is where the 2 sigma_b of :func:`effective_noise_multiplier` comes from.

    The whole state is these four values, so a checkpoint is ``dataclasses.asdict(self)``.

    Attributes:
        clip: the current clip norm C (> 0); clients clip to it this round.
        target_quantile: gamma in [0, 1], the fraction of updates meant to fall within C.
        learning_rate: eta_C >= 0 of the geometric update.
        count_noise_std: sigma_b >= 0, std of the noise on the clipped-count sum.
    """

    clip: float
    target_quantile: float = 0.5
    learning_rate: float = 0.2
    count_noise_std: float = 0.0

    def __post_init__(self) -> None:
        _check_clip(self.clip)
        if not 0 <= self.target_quantile <= 1:
            raise ValueError(f"target_quantile must be in [0, 1]; got {self.target_quantile!r}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate >= 0):
            raise ValueError(f"learning_rate must be a finite number >= 0; got {self.learning_rate!r}")
        if not (math.isfinite(self.count_noise_std) and self.count_noise_std >= 0):
            raise ValueError(f"count_noise_std must be a finite number >= 0; got {self.count_noise_std!r}")

    @classmethod
    def recommended(cls, clip: float, cohort_size: int) -> "AdaptiveClip":
        """The paper's defaults: median (gamma 0.5), eta_C 0.2, sigma_b = m / 20."""
        return cls(clip=clip, target_quantile=0.5, learning_rate=0.2, count_noise_std=cohort_size / 20)

    def clipped_fraction(
        self, norms: Sequence[float], cohort_size: int, generator: "torch.Generator"
    ) -> float:
        """b_bar: the noised fraction of this round's updates with norm <= clip."""
        import torch

        _check_cohort(len(norms), cohort_size)
        centred = sum((1.0 if n <= self.clip else 0.0) - 0.5 for n in norms)
        if self.count_noise_std > 0:
            noise = torch.randn((), generator=generator, dtype=torch.float64, device=generator.device)
            centred += self.count_noise_std * float(noise)
        return centred / cohort_size + 0.5

    def update(
        self, norms: Sequence[float], cohort_size: int, generator: "torch.Generator"
    ) -> "AdaptiveClip":
        """The state for the next round, given the unclipped norms of this round's updates.

        Args:
            norms: ||delta_i|| of each received update before clipping (only 1[norm <= C] is used).
            cohort_size: m, the fixed denominator (clients sampled per round).
            generator: source of the count noise.

        Raises:
            ValueError: if there are more norms than ``cohort_size``.
        """
        b_bar = self.clipped_fraction(norms, cohort_size, generator)
        factor = math.exp(-self.learning_rate * (b_bar - self.target_quantile))
        return replace(self, clip=self.clip * factor)


def _check_cohort(received: int, cohort_size: int) -> None:
    if not (isinstance(cohort_size, int) and cohort_size >= 1):
        raise ValueError(f"cohort_size must be an integer >= 1; got {cohort_size!r}")
    if received > cohort_size:
        raise ValueError(
            f"got {received} updates for a cohort of {cohort_size}; expected at most {cohort_size}"
        )


def _fixed_denominator_mean(updates: "Sequence[NamedTensors]", denominator: int) -> "dict[str, torch.Tensor]":
    """sum_i u_i / denominator in float64, cast back to each tensor's dtype."""
    import torch

    from fedfm.tensors import add_into_

    first = updates[0]
    for u in updates[1:]:
        if list(u) != list(first):
            raise ValueError(f"updates disagree on names: {list(u)} vs {list(first)}")
    out = {}
    for k, ref in first.items():
        acc = torch.zeros(ref.shape, dtype=torch.float64, device=ref.device)
        for u in updates:
            add_into_(acc, u[k])
        out[k] = (acc / denominator).to(ref.dtype)
    return out


ClipState = Union[float, AdaptiveClip]
"""A fixed clip norm, or the adaptive-clip state whose ``clip`` is this round's norm."""


@dataclass(frozen=True)
class CentralGaussian:
    """Server step of DP-FedAvg (McMahan et al. 2018, "Learning differentially private recurrent
    language models"): user-level central DP.

    Clients clip their update to C. The server averages with uniform weights over a *fixed*
    denominator m (the cohort size, i.e. the expected number of sampled clients: McMahan et al.'s
    fixed-denominator estimator with w_k = 1), so adding or removing one client moves the average
    by at most C / m, and adds N(0, (z_delta C / m)^2) per coordinate. With all m clients
    reporting this is the plain uniform mean; a dropped client still counts in m.

    With adaptive clipping, C is the state's current clip and z_delta is
    :func:`effective_noise_multiplier` (z, sigma_b), so that update plus count cost exactly z.

    Attributes:
        noise_multiplier: z, what the accountant is charged per round (>= 0).
        cohort_size: m, clients sampled per round (the fixed denominator).
    """

    noise_multiplier: float
    cohort_size: int

    def __post_init__(self) -> None:
        _check_noise_multiplier(self.noise_multiplier)
        _check_cohort(0, self.cohort_size)

    def update_noise_multiplier(self, clip_state: ClipState) -> float:
        """z_delta: z with a fixed clip, z reduced for the count noise with an adaptive one."""
        if isinstance(clip_state, AdaptiveClip):
            return effective_noise_multiplier(self.noise_multiplier, clip_state.count_noise_std)
        return self.noise_multiplier

    def aggregate(
        self, updates: "Sequence[NamedTensors]", clip_state: ClipState, generator: "torch.Generator"
    ) -> "dict[str, torch.Tensor]":
        """Noised fixed-denominator mean of the clipped updates.

        Updates are clipped again here (a no-op for correctly clipped ones), so the sensitivity
        holds whatever the clients sent.

        Args:
            updates: the clients' deltas, at least one, at most ``cohort_size``.
            clip_state: this round's clip norm, or the adaptive-clip state holding it.
            generator: source of the noise.

        Raises:
            ValueError: on no updates, more than ``cohort_size``, mismatched names, or a too small
                count noise for adaptive clipping.
        """
        if not updates:
            raise ValueError("DP-FedAvg needs at least one update; got zero updates")
        _check_cohort(len(updates), self.cohort_size)
        bound = clip_state.clip if isinstance(clip_state, AdaptiveClip) else float(clip_state)
        _check_clip(bound)
        std = self.update_noise_multiplier(clip_state) * bound / self.cohort_size
        mean = _fixed_denominator_mean([clip(u, bound)[0] for u in updates], self.cohort_size)
        return add_noise(mean, std, generator)

    def event(self, sampling_rate: float) -> "dp_accounting.DpEvent":
        """The DpEvent of one round: Poisson(q) sampling of a Gaussian with multiplier z."""
        return round_event(self.noise_multiplier, sampling_rate)


@dataclass(frozen=True)
class LocalGaussian:
    """Local DP on updates: each client clips to C and adds N(0, (z C)^2) before sending.

    Local DP protects a client's update against the server itself, for any two updates the
    client might send. Two updates in the C-ball differ by up to 2C, so each release is a
    Gaussian mechanism with multiplier z / 2 relative to that sensitivity; :meth:`event` says so.
    Sampling does not amplify it (the server knows who sent what).

    Attributes:
        clip: the clip norm C (> 0).
        noise_multiplier: z; the noise std is z * C.
    """

    clip: float
    noise_multiplier: float

    def __post_init__(self) -> None:
        _check_clip(self.clip)
        _check_noise_multiplier(self.noise_multiplier)

    def privatize(
        self, delta: "NamedTensors", generator: "torch.Generator"
    ) -> "tuple[dict[str, torch.Tensor], float]":
        """(clipped and noised update, unclipped norm): what the client sends."""
        clipped, norm = clip(delta, self.clip)
        return add_noise(clipped, self.noise_multiplier * self.clip, generator), norm

    def event(self) -> "dp_accounting.DpEvent":
        """One client's DpEvent for one round it takes part in: GaussianDpEvent(z / 2)."""
        return round_event(self.noise_multiplier / 2, 1.0)
