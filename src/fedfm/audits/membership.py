"""Membership inference: does a model reveal which examples it was trained on?

Two attacks, scored the same way (ROC AUC, TPR at a low FPR, membership advantage):

- Loss threshold (Yeom et al. 2018, "Privacy risk in machine learning: analyzing the connection to
  overfitting", CSF): an example is called a member when its loss is low; the score is -loss.
- Likelihood-ratio attack, LiRA (Carlini et al. 2022, "Membership inference attacks from first
  principles", S&P): shadow models trained on random halves of a population give, per example,
  the distribution of the logit-scaled confidence phi = log(p / (1 - p)) on the true label when
  the example is OUT of training (and IN, online). Offline, the score is the one-sided test
  statistic (phi - mu_out) / sigma_out, a monotone function of the Gaussian CDF Carlini et al. use,
  so the ROC is the same; online, it is the log-likelihood ratio log N(phi; IN) - log N(phi; OUT).

Carlini et al. argue for TPR at a low FPR (e.g. 1%) over AUC: an attack that confidently
identifies a few members is a real leak even when its average-case AUC is near 0.5.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from fedfm.models.handle import ModelHandle

StatFn = Callable[[np.ndarray], np.ndarray]
"""Population indices -> one statistic per example (the logit-scaled confidence, for LiRA)."""


@dataclass(frozen=True)
class MembershipResult:
    """How well scores separate members (training examples) from non-members.

    Attributes:
        auc: ROC AUC, the probability that a random member scores above a random non-member
            (ties count one half); 0.5 is chance.
        tpr_at_fpr: the highest true-positive rate among thresholds whose false-positive rate is at
            most ``fpr`` (Carlini et al. 2022's headline number).
        fpr: the false-positive rate ``tpr_at_fpr`` is read at.
        advantage: max over thresholds of TPR - FPR, Yeom et al.'s membership advantage.
        num_members: member examples scored.
        num_nonmembers: non-member examples scored.
    """

    auc: float
    tpr_at_fpr: float
    fpr: float
    advantage: float
    num_members: int
    num_nonmembers: int


def auc(member_scores: np.ndarray, nonmember_scores: np.ndarray) -> float:
    """ROC AUC by the Mann-Whitney U statistic: (rank sum of members - n_m (n_m + 1) / 2) /
    (n_m n_n), with tied scores sharing their mean rank (so a tie counts one half).

    Raises:
        ValueError: either group is empty or holds a NaN.
    """
    m, n = _check_scores(member_scores, nonmember_scores)
    ranks = _mid_ranks(np.concatenate([m, n]))
    u = ranks[: len(m)].sum() - len(m) * (len(m) + 1) / 2
    return float(u / (len(m) * len(n)))


def roc_curve(member_scores: np.ndarray, nonmember_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) of the rule "member if score >= t" at every distinct score t, from (0, 0) to (1, 1)."""
    m, n = _check_scores(member_scores, nonmember_scores)
    scores = np.concatenate([m, n])
    is_member = np.concatenate([np.ones(len(m)), np.zeros(len(n))])
    order = np.argsort(-scores, kind="stable")
    scores, is_member = scores[order], is_member[order]
    last_of_tie = np.r_[scores[1:] != scores[:-1], True]  # a threshold takes a tie group whole
    tp = np.cumsum(is_member)[last_of_tie]
    fp = np.cumsum(1 - is_member)[last_of_tie]
    return np.r_[0.0, fp / len(n)], np.r_[0.0, tp / len(m)]


def score_attack(member_scores: np.ndarray, nonmember_scores: np.ndarray, fpr: float = 0.01) -> MembershipResult:
    """AUC, TPR at ``fpr`` and advantage of scores where higher means "more likely a member"."""
    if not 0.0 <= fpr <= 1.0:
        raise ValueError(f"fpr must be in [0, 1], got {fpr}")
    fprs, tprs = roc_curve(member_scores, nonmember_scores)
    return MembershipResult(
        auc=auc(member_scores, nonmember_scores), tpr_at_fpr=float(tprs[fprs <= fpr].max()), fpr=fpr,
        advantage=float((tprs - fprs).max()), num_members=len(member_scores), num_nonmembers=len(nonmember_scores),
    )


def loss_threshold_attack(member_losses: np.ndarray, nonmember_losses: np.ndarray,
                          fpr: float = 0.01) -> MembershipResult:
    """Yeom et al. (2018): members have lower loss; the score is -loss."""
    return score_attack(-np.asarray(member_losses), -np.asarray(nonmember_losses), fpr)


# --- per-example statistics of a model --------------------------------------------------------


@dataclass(frozen=True)
class ExampleStats:
    """Per-example statistics of one model, in the order of the indices asked for.

    Attributes:
        loss: cross-entropy on the true label (language models: mean over predicted tokens).
        confidence: logit-scaled confidence phi = log(p / (1 - p)) of the true label, LiRA's
            statistic. Classification computes it from the logits as z_y - logsumexp_{j != y} z_j
            (Carlini et al.'s stable form); language models use p = exp(-loss).
    """

    loss: np.ndarray
    confidence: np.ndarray


@torch.inference_mode()
def example_stats(handle: ModelHandle, data: Any, idx: np.ndarray, batch_size: int = 64) -> ExampleStats:
    """Loss and logit-scaled confidence per example of ``data[idx]`` under the handle's current
    params, in eval mode, batched without gradients.

    ``data`` is anything with ``batch(idx, rng)`` giving model inputs plus ``labels``: tokenized
    texts, images, or LM texts (masked LM uses the evaluator's fixed masking, seed 0).
    """
    from fedfm.data.tokenized import LMTexts

    model, was_training = handle.model, handle.model.training
    model.eval()
    rng = np.random.default_rng(0)
    losses, conf = [], []
    try:
        for start in range(0, len(idx), batch_size):
            batch = dict(data.batch(np.asarray(idx)[start : start + batch_size], rng))
            labels = batch.pop("labels")
            logits = _logits(model(**batch)).double()
            if isinstance(data, LMTexts):
                loss = _sequence_loss(logits, labels, data.objective == "clm")
                losses.append(loss)
                conf.append(_confidence_from_loss(loss))
            else:
                losses.append(torch.nn.functional.cross_entropy(logits, labels, reduction="none"))
                conf.append(_confidence_from_logits(logits, labels))
    finally:
        model.train(was_training)
    return ExampleStats(loss=torch.cat(losses).numpy(), confidence=torch.cat(conf).numpy())


def _logits(out: Any) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out


def _sequence_loss(logits: torch.Tensor, labels: torch.Tensor, causal: bool) -> torch.Tensor:
    if causal:  # position t predicts token t + 1
        logits, labels = logits[:, :-1], labels[:, 1:]
    per_token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none", ignore_index=-100)
    counts = (labels != -100).sum(1).clamp(min=1)
    return per_token.sum(1) / counts


def _confidence_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    true = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.scatter(1, labels[:, None], float("-inf"))
    return true - torch.logsumexp(others, dim=1)


def _confidence_from_loss(loss: torch.Tensor) -> torch.Tensor:
    loss = loss.clamp(min=1e-12)  # p = 1 exactly would give +inf
    return -loss - torch.log(-torch.expm1(-loss))


# --- LiRA -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GaussianFit:
    """Per-example Gaussians of a statistic over shadow models (each array has one entry per
    example; NaN where no shadow model had the example IN, resp. OUT).

    Standard deviations are the population (ddof=0) standard deviations of the shadow values.
    """

    mu_in: np.ndarray
    sd_in: np.ndarray
    mu_out: np.ndarray
    sd_out: np.ndarray


@dataclass(frozen=True)
class LiraResult:
    """A LiRA run: the attack's score on the target, the Gaussians, and the per-example scores."""

    result: MembershipResult
    fit: GaussianFit
    scores: np.ndarray


def shadow_splits(population: int, num_shadow: int, seed: int) -> np.ndarray:
    """(num_shadow, population) bool: which shadow model trains on which example. Every example is
    IN for exactly half of the shadow models (Carlini et al.'s balanced splits), so each has both
    IN and OUT fits; each model trains on about half the population.

    Raises:
        ValueError: fewer than 2 shadow models, or an odd number.
    """
    if num_shadow < 2 or num_shadow % 2:
        raise ValueError(f"LiRA needs an even number >= 2 of shadow models, got {num_shadow}")
    noise = np.random.default_rng(seed).random((num_shadow, population))
    return noise.argsort(0).argsort(0) < num_shadow // 2


def fit_gaussians(shadow_stats: np.ndarray, shadow_in: np.ndarray) -> GaussianFit:
    """Mean and standard deviation per example over the shadow models that had it IN and OUT.

    Args:
        shadow_stats: (num_shadow, population) statistic of each shadow model on each example.
        shadow_in: same shape, bool: the example was in that model's training set.
    """
    stats, inside = np.asarray(shadow_stats, dtype=np.float64), np.asarray(shadow_in, dtype=bool)
    if stats.shape != inside.shape:
        raise ValueError(f"shadow_stats {stats.shape} and shadow_in {inside.shape} must have the same shape")

    def moments(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        count = mask.sum(0)
        with np.errstate(invalid="ignore", divide="ignore"):
            mu = np.where(mask, stats, 0.0).sum(0) / count
            var = np.where(mask, (stats - mu) ** 2, 0.0).sum(0) / count
        return mu, np.sqrt(var)

    mu_in, sd_in = moments(inside)
    mu_out, sd_out = moments(~inside)
    return GaussianFit(mu_in=mu_in, sd_in=sd_in, mu_out=mu_out, sd_out=sd_out)


def lira_scores(target_stats: np.ndarray, fit: GaussianFit, online: bool = False, fixed_variance: bool = False,
                min_std: float = 1e-6) -> np.ndarray:
    """Per-example LiRA scores (higher = more likely a member).

    Args:
        target_stats: the target model's statistic on each example.
        fit: the shadow models' Gaussians.
        online: use the IN Gaussian too (log-likelihood ratio); else the offline one-sided test.
        fixed_variance: one standard deviation for all examples (the mean of the per-example
            ones), which Carlini et al. find better with few shadow models.
        min_std: floor on standard deviations (a single OUT model has a zero spread).
    """
    phi = np.asarray(target_stats, dtype=np.float64)
    sd_out = _spread(fit.sd_out, fixed_variance, min_std)
    if not online:
        return (phi - fit.mu_out) / sd_out
    sd_in = _spread(fit.sd_in, fixed_variance, min_std)
    return _log_normal(phi, fit.mu_in, sd_in) - _log_normal(phi, fit.mu_out, sd_out)


def lira_attack(train_fn: Callable[[np.ndarray], StatFn], target_stats: np.ndarray, members: np.ndarray,
                num_shadow: int = 4, seed: int = 0, online: bool = False, fixed_variance: bool = False,
                fpr: float = 0.01) -> LiraResult:
    """LiRA against a target model over a population (Carlini et al. 2022).

    Args:
        train_fn: trains one shadow model on the given population indices and returns its
            statistic function (population indices -> logit-scaled confidences).
        target_stats: (population,) the target model's statistic per example.
        members: (population,) bool, the truth: the example trained the target model.
        num_shadow: shadow models to train (even; small values work with ``fixed_variance``).
        seed: seeds the shadow splits.

    Raises:
        ValueError: shapes differ, or members holds only one class.
    """
    target, truth = np.asarray(target_stats, dtype=np.float64), np.asarray(members, dtype=bool)
    if target.shape != truth.shape or target.ndim != 1:
        raise ValueError(f"target_stats {target.shape} and members {truth.shape} must be equal 1-D shapes")
    everyone = np.arange(len(target))
    splits = shadow_splits(len(target), num_shadow, seed)
    shadow = np.stack([np.asarray(train_fn(everyone[inside])(everyone)) for inside in splits])
    fit = fit_gaussians(shadow, splits)
    scores = lira_scores(target, fit, online, fixed_variance)
    return LiraResult(result=score_attack(scores[truth], scores[~truth], fpr), fit=fit, scores=scores)


def _spread(sd: np.ndarray, fixed: bool, floor: float) -> np.ndarray:
    sd = np.full_like(sd, np.nanmean(sd)) if fixed else sd
    return np.maximum(sd, floor)


def _log_normal(x: np.ndarray, mu: np.ndarray, sd: np.ndarray) -> np.ndarray:
    return -0.5 * ((x - mu) / sd) ** 2 - np.log(sd)


def _check_scores(member_scores: np.ndarray, nonmember_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    m = np.asarray(member_scores, dtype=np.float64).ravel()
    n = np.asarray(nonmember_scores, dtype=np.float64).ravel()
    if not len(m) or not len(n):
        raise ValueError(f"need members and non-members to score, got {len(m)} and {len(n)}")
    if np.isnan(m).any() or np.isnan(n).any():
        raise ValueError("membership scores hold NaN")
    return m, n


def _mid_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their mean rank."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    upper = np.cumsum(counts)  # rank of each value group's last member
    return (upper - (counts - 1) / 2.0)[inverse]

