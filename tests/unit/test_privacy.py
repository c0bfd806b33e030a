"""DP mechanisms and accounting against references: dp_accounting itself, formulas by hand, and
the moments of the Gaussian. Float tolerances: epsilons 1e-6 absolute (same library, same events);
clipped norms exact (<= bound, float64 norm of the cast tensors); noise moments 5 standard errors."""

from __future__ import annotations

import logging
import math

import dp_accounting as dp
import pytest
import torch

from fedfm.privacy import (
    Accountant,
    AdaptiveClip,
    CentralGaussian,
    LocalGaussian,
    add_noise,
    calibrate_noise,
    clip,
    effective_noise_multiplier,
    epsilon_after,
    epsilon_per_round,
    gaussian_noise_like,
    global_norm,
    round_event,
    sampling_rate,
)
from fedfm.privacy.accounting import PLD_DISCRETIZATION

# dp_accounting's RDP logs a warning per fractional order whose series it truncates.
logging.getLogger("absl").setLevel(logging.ERROR)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _reference(kind: str) -> dp.PrivacyAccountant:
    if kind == "rdp":
        return dp.rdp.RdpAccountant()
    return dp.pld.PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)


# ---------------------------------------------------------------- accounting against dp_accounting


@pytest.mark.parametrize(
    "kind,z,q,rounds,delta",
    [
        ("rdp", 2.0, 0.1, 20, 1e-5),
        ("rdp", 5.0, 0.5, 5, 1e-6),
        ("pld", 1.1, 0.05, 20, 1e-5),
        ("pld", 2.0, 0.5, 5, 1e-6),
    ],
)
def test_accountant_matches_dp_accounting(kind, z, q, rounds, delta):
    ours = Accountant(kind)
    for _ in range(rounds):  # one compose per round, as the round pipeline does
        ours = ours.compose(round_event(z, q))
    ref = _reference(kind).compose(dp.PoissonSampledDpEvent(q, dp.GaussianDpEvent(z)), rounds)
    assert ours.ledger == ((dp.PoissonSampledDpEvent(q, dp.GaussianDpEvent(z)), rounds),)
    assert ours.epsilon(delta) == pytest.approx(ref.get_epsilon(delta), abs=1e-6)
    assert epsilon_after(rounds, z, q, delta, kind) == pytest.approx(ref.get_epsilon(delta), abs=1e-6)


@pytest.mark.parametrize("kind", ["rdp", "pld"])
def test_accountant_mixed_ledger_matches_dp_accounting(kind):
    a = dp.PoissonSampledDpEvent(0.1, dp.GaussianDpEvent(2.0))
    b = dp.PoissonSampledDpEvent(0.2, dp.GaussianDpEvent(4.0))
    ours = Accountant(kind).compose(a, 3).compose(b).compose(b).compose(a)
    ref = _reference(kind).compose(a, 3).compose(b, 2).compose(a)
    assert [n for _, n in ours.ledger] == [3, 2, 1]
    assert ours.epsilon(1e-5) == pytest.approx(ref.get_epsilon(1e-5), abs=1e-6)


def test_round_event_forms():
    assert round_event(1.3, 0.25) == dp.PoissonSampledDpEvent(0.25, dp.GaussianDpEvent(1.3))
    assert round_event(1.3, 1.0) == dp.GaussianDpEvent(1.3)
    assert Accountant().compose(round_event(0.0, 0.5)).epsilon(1e-5) == math.inf
    assert Accountant().epsilon(1e-5) == 0.0
    assert sampling_rate(10, 200) == 0.05


def test_epsilon_per_round_is_the_running_epsilon():
    eps = epsilon_per_round(4, 2.0, 0.1, 1e-5)
    assert len(eps) == 4 and all(x < y for x, y in zip(eps, eps[1:]))
    ref = dp.rdp.RdpAccountant()
    for r in range(4):
        ref.compose(dp.PoissonSampledDpEvent(0.1, dp.GaussianDpEvent(2.0)))
        assert eps[r] == pytest.approx(ref.get_epsilon(1e-5), abs=1e-6)


# ---------------------------------------------------------------- calibration


def _check_calibrated(eps_target, q, rounds, kind, delta=1e-5):
    z = calibrate_noise(eps_target, delta, rounds, q, kind)
    assert epsilon_after(rounds, z, q, delta, kind) <= eps_target
    assert epsilon_after(rounds, 0.99 * z, q, delta, kind) > eps_target  # the smallest, within tolerance


@pytest.mark.parametrize("eps_target", [0.5, 1.0, 4.0, 8.0])
@pytest.mark.parametrize("rounds", [1, 10, 100])
def test_calibration_never_overshoots_full_participation(eps_target, rounds):
    _check_calibrated(eps_target, 1.0, rounds, "rdp")


# Sampled cohorts are slow to account for (seconds per calibration): a sample of the grid.
@pytest.mark.parametrize("eps_target,q,rounds", [(0.5, 0.05, 10), (1.0, 0.05, 100)])
def test_calibration_never_overshoots_sampled(eps_target, q, rounds):
    _check_calibrated(eps_target, q, rounds, "rdp")


@pytest.mark.parametrize(
    "eps_target,q,rounds", [(1.0, 1.0, 10), (1.0, 0.5, 1), (8.0, 0.5, 100), (1.0, 0.05, 100)]
)
def test_calibration_never_overshoots_pld(eps_target, q, rounds):
    _check_calibrated(eps_target, q, rounds, "pld")


# ---------------------------------------------------------------- clipping


@pytest.mark.parametrize("scale", [1e-6, 1e-3, 1.0, 1e3, 1e6, 1e9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_clip_never_exceeds_bound(scale, dtype):
    g = _gen(1)
    for bound in (1e-3, 0.7, 1.0, 5.0):
        delta = {
            "a": (torch.randn(37, 5, generator=g) * scale).to(dtype),
            "b": (torch.randn(11, generator=g) * scale).to(dtype),
        }
        clipped, norm = clip(delta, bound)
        assert norm == pytest.approx(global_norm(delta), rel=1e-12)
        assert global_norm(clipped) <= bound
        assert all(clipped[k].dtype == dtype for k in delta)
        flat = torch.cat([v.double().flatten() for v in delta.values()])
        flat_c = torch.cat([v.double().flatten() for v in clipped.values()])
        cos = torch.nn.functional.cosine_similarity(flat, flat_c, dim=0)
        assert cos > 1 - (1e-3 if dtype == torch.bfloat16 else 1e-6)  # direction kept
        if norm > bound:
            assert global_norm(clipped) == pytest.approx(bound, rel=1e-2 if dtype == torch.bfloat16 else 1e-6)


def test_clip_leaves_small_updates_unchanged():
    delta = {"a": torch.tensor([0.375, -0.5]), "b": torch.tensor([[0.0]])}
    clipped, norm = clip(delta, 1.0)
    assert norm == 0.625
    assert all(clipped[k] is delta[k] for k in delta)
    clipped, _ = clip(delta, 0.625)  # exactly on the bound: unchanged too
    assert all(clipped[k] is delta[k] for k in delta)


def test_global_norm_is_the_flat_l2_norm():
    delta = {"a": torch.tensor([3.0]), "b": torch.tensor([[4.0, 12.0]])}
    assert global_norm(delta) == 13.0
    assert global_norm({}) == 0.0


# ---------------------------------------------------------------- Gaussian noise


def test_gaussian_noise_moments():
    n, std = 200_000, 0.37
    noise = gaussian_noise_like({"a": torch.zeros(n // 2), "b": torch.zeros(n // 4, 2)}, std, _gen(2))
    assert noise["b"].shape == (n // 4, 2) and noise["a"].dtype == torch.float32
    x = torch.cat([v.double().flatten() for v in noise.values()])
    mean, var = float(x.mean()), float(x.var())
    kurt = float(((x - mean) ** 4).mean()) / var**2 - 3.0
    assert abs(mean) < 5 * std / math.sqrt(n)
    assert abs(var - std**2) < 5 * std**2 * math.sqrt(2 / n)
    assert abs(kurt) < 5 * math.sqrt(24 / n)


def test_noise_is_seeded_and_zero_std_is_exact():
    d = {"a": torch.ones(5)}
    assert torch.equal(add_noise(d, 1.0, _gen(3))["a"], add_noise(d, 1.0, _gen(3))["a"])
    assert not torch.equal(add_noise(d, 1.0, _gen(3))["a"], add_noise(d, 1.0, _gen(4))["a"])
    assert torch.equal(add_noise(d, 0.0, _gen(3))["a"], d["a"])


# ---------------------------------------------------------------- DP-FedAvg (central)


def _updates(m: int, dim: int, seed: int) -> list[dict[str, torch.Tensor]]:
    g = _gen(seed)
    return [
        {"w": torch.randn(dim, generator=g) * (0.3 + i), "b": torch.randn(3, generator=g)} for i in range(m)
    ]


def test_dp_fedavg_without_noise_is_the_uniform_mean_of_clipped():
    ups, bound = _updates(4, 20, 5), 2.0
    clipped = [clip(u, bound)[0] for u in ups]
    out = CentralGaussian(noise_multiplier=0.0, cohort_size=4).aggregate(ups, bound, _gen())
    for k in ("w", "b"):
        ref = torch.stack([c[k].double() for c in clipped]).mean(0).float()
        assert torch.equal(out[k], ref)
    # a dropped client still counts in the fixed denominator m
    out = CentralGaussian(noise_multiplier=0.0, cohort_size=8).aggregate(ups, bound, _gen())
    ref = torch.stack([c["w"].double() for c in clipped]).sum(0) / 8
    assert torch.allclose(out["w"].double(), ref, atol=1e-7)


def test_dp_fedavg_noise_std_is_z_clip_over_m():
    m, dim, z, bound = 4, 50_000, 1.3, 0.8
    ups = _updates(m, dim, 6)
    mean = CentralGaussian(0.0, m).aggregate(ups, bound, _gen())
    out = CentralGaussian(z, m).aggregate(ups, bound, _gen(7))
    resid = torch.cat([(out[k] - mean[k]).double().flatten() for k in out])
    expected = z * bound / m
    assert abs(float(resid.std()) - expected) < 5 * expected / math.sqrt(2 * resid.numel())
    assert CentralGaussian(z, m).event(0.1) == dp.PoissonSampledDpEvent(0.1, dp.GaussianDpEvent(z))


def test_dp_fedavg_with_adaptive_clip_uses_reduced_noise_and_current_clip():
    m, z = 4, 1.0
    state = AdaptiveClip(clip=0.5, count_noise_std=2.0)
    ups = _updates(m, 50_000, 8)
    mean = CentralGaussian(0.0, m).aggregate(ups, 0.5, _gen())
    out = CentralGaussian(z, m).aggregate(ups, state, _gen(9))
    resid = torch.cat([(out[k] - mean[k]).double().flatten() for k in out])
    expected = (1.0 - 1.0 / 16) ** -0.5 * 0.5 / m  # z_delta = (z^-2 - (2 sigma_b)^-2)^-1/2, by hand
    assert abs(float(resid.std()) - expected) < 5 * expected / math.sqrt(2 * resid.numel())
    with pytest.raises(ValueError, match="count_noise_std"):
        CentralGaussian(z, m).aggregate(ups, AdaptiveClip(clip=0.5, count_noise_std=0.4), _gen())


# ---------------------------------------------------------------- adaptive clipping


def test_adaptive_clip_deterministic_step_by_hand():
    state = AdaptiveClip(clip=1.0, target_quantile=0.5, learning_rate=0.2, count_noise_std=0.0)
    new = state.update([0.5, 0.9, 1.0, 3.0], cohort_size=4, generator=_gen())  # b = 1, 1, 1, 0
    assert new.clip == pytest.approx(1.0 * math.exp(-0.2 * (3 / 4 - 0.5)), rel=1e-15)
    assert (new.target_quantile, new.learning_rate, new.count_noise_std) == (0.5, 0.2, 0.0)
    assert state.clip == 1.0  # state in, new state out
    # two of a cohort of 4 reported: the centred count leaves the two missing neutral
    assert state.clipped_fraction([0.5, 3.0], 4, _gen()) == pytest.approx((0.5 - 0.5) / 4 + 0.5)


@pytest.mark.parametrize("noise", [0.0, 5.0])
def test_adaptive_clip_converges_to_the_quantile(noise):
    g = _gen(10)
    norms = (torch.rand(100, generator=g) * 4 - 2).exp().tolist()  # log-uniform over [e^-2, e^2]
    gamma = 0.3
    state = AdaptiveClip(clip=50.0, target_quantile=gamma, learning_rate=0.2, count_noise_std=noise)
    fractions = []
    for r in range(400):
        state = state.update(norms, cohort_size=100, generator=g)
        if r >= 200:
            fractions.append(sum(n <= state.clip for n in norms) / 100)
    assert abs(sum(fractions) / len(fractions) - gamma) < 0.05
    assert max(abs(f - gamma) for f in fractions) < (0.03 if noise == 0 else 0.25)


def test_effective_noise_multiplier_by_hand_and_against_composition():
    assert effective_noise_multiplier(1.0, 1.0) == pytest.approx(0.75**-0.5, rel=1e-15)
    assert effective_noise_multiplier(0.0, 0.0) == 0.0
    z, sigma_b = 0.9, 2.5
    z_delta = effective_noise_multiplier(z, sigma_b)
    both = dp.ComposedDpEvent([dp.GaussianDpEvent(z_delta), dp.GaussianDpEvent(2 * sigma_b)])
    # the update and the centred count together cost exactly one Gaussian with multiplier z
    assert dp.rdp.RdpAccountant().compose(both).get_epsilon(1e-5) == pytest.approx(
        dp.rdp.RdpAccountant().compose(dp.GaussianDpEvent(z)).get_epsilon(1e-5), rel=1e-9
    )
    with pytest.raises(ValueError, match="count_noise_std > noise_multiplier / 2"):
        effective_noise_multiplier(1.0, 0.5)
    with pytest.raises(ValueError, match="too small"):
        effective_noise_multiplier(1.0, 0.0)


# ---------------------------------------------------------------- local DP


def test_local_gaussian_clips_noises_and_reports_its_event():
    mech = LocalGaussian(clip=0.5, noise_multiplier=2.0)
    delta = {"w": torch.full((100_000,), 1.0)}
    sent, norm = mech.privatize(delta, _gen(11))
    clipped, _ = clip(delta, 0.5)
    resid = (sent["w"] - clipped["w"]).double()
    assert norm == pytest.approx(math.sqrt(100_000))
    assert abs(float(resid.std()) - 1.0) < 5 / math.sqrt(2 * resid.numel())
    assert mech.event() == dp.GaussianDpEvent(1.0)  # sensitivity 2C between any two updates


# ---------------------------------------------------------------- bad inputs


def test_bad_inputs_name_the_allowed_values():
    d = {"a": torch.ones(2)}
    with pytest.raises(ValueError, match="clip must be a finite number > 0"):
        clip(d, -1.0)
    with pytest.raises(ValueError, match="clip must be a finite number > 0"):
        LocalGaussian(clip=0.0, noise_multiplier=1.0)
    with pytest.raises(ValueError, match=r"delta must be in the open interval \(0, 1\)"):
        Accountant().epsilon(1.0)
    with pytest.raises(ValueError, match=r"delta must be in the open interval \(0, 1\)"):
        calibrate_noise(1.0, 0.0, 10, 0.1)
    with pytest.raises(ValueError, match="one of 'rdp', 'pld'; got 'moments'"):
        Accountant("moments")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="one of 'rdp', 'pld'"):
        calibrate_noise(1.0, 1e-5, 10, 0.1, "gdp")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'pld' accountant does not support"):
        Accountant("pld").compose(dp.SampledWithoutReplacementDpEvent(100, 10, dp.GaussianDpEvent(1.0)))
    with pytest.raises(ValueError, match=r"sampling_rate must be in \(0, 1\]"):
        round_event(1.0, 0.0)
    with pytest.raises(ValueError, match="noise_multiplier must be a finite number >= 0"):
        CentralGaussian(noise_multiplier=-1.0, cohort_size=4)
    with pytest.raises(ValueError, match="target_quantile must be in"):
        AdaptiveClip(clip=1.0, target_quantile=1.5)
    with pytest.raises(ValueError, match="at most 2"):
        CentralGaussian(1.0, 2).aggregate([d, d, d], 1.0, _gen())
    with pytest.raises(ValueError, match="zero updates"):
        CentralGaussian(1.0, 2).aggregate([], 1.0, _gen())
    with pytest.raises(ValueError, match="non-finite"):
        clip({"a": torch.tensor([float("nan")])}, 1.0)
