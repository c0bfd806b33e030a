"""Gradient inversion: how much of a client's training batch its update gives away.

The adversary is an honest-but-curious server: it knows the architecture and the parameters it
sent (``before``) and sees one client's update. For one local SGD step with learning rate lr the
update is -lr * gradient; gradient matching below uses the cosine distance, which ignores the
scale, so an unknown lr costs nothing (only its sign matters). Multi-step updates (several local
steps, Adam) are inverted as if they were one gradient: an approximation the audit reports
honestly through its success numbers.

- Images: "Deep leakage from gradients" (DLG, Zhu et al. 2019, NeurIPS) optimises dummy inputs
  so their gradient matches the observed one; "Inverting gradients" (Geiping et al. 2020, NeurIPS)
  matches by cosine distance, adds a total-variation prior, uses Adam on signed gradients with
  step decay, and a box constraint. Labels are inferred analytically (iDLG, Zhao et al. 2020): with
  cross-entropy, the last layer's bias gradient is p - y, negative only at the true label.
- Text, embeddings train (full fine-tuning): an input embedding row gets a gradient only when its
  token is in the batch, so the non-zero rows of the embedding update are the batch's token set
  (Melis et al. 2019, "Exploiting unintended feature leakage in collaborative learning", S&P).
  Exact for untied input embeddings; a tied LM head makes every row non-zero.
- Text, only adapters travel (LoRA + head): the embedding rows stay home, so dummy input
  embeddings are optimised to match the adapter gradients and each position is projected to the
  nearest token embedding (TAG, Deng et al. 2021; LAMP, Balunovic et al. 2022, without LAMP's
  discrete search and language-model prior).
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Literal, Mapping, Optional, Sequence

import numpy as np
import torch

from fedfm.models.handle import ModelHandle
from fedfm.types import NamedTensors

LabelSource = Literal["infer", "known", "learn"]
"""Where the attack's labels come from: inferred from the last layer's gradient (iDLG), given
(the server knows them), or learned jointly as soft labels (DLG)."""


@dataclass(frozen=True)
class InversionResult:
    """One image-inversion audit.

    Attributes:
        psnr: mean per-image PSNR (dB) of the reconstruction against the true images, images
            paired by the assignment of least total MSE.
        mse: mean squared error over all pixels, same pairing.
        baseline_psnr: the same PSNR for uniform random images in the data range (what knowing
            nothing gives); the leak is psnr - baseline_psnr.
        labels: the labels the attack used, in the order it used them.
        label_accuracy: share of the true labels (as a multiset) the attack used.
        grad_distance: cosine distance of the reconstruction's gradient to the observed one.
        reconstruction: (B, C, H, W), reordered to match the true batch.
    """

    psnr: float
    mse: float
    baseline_psnr: float
    labels: tuple[int, ...]
    label_accuracy: float
    grad_distance: float
    reconstruction: torch.Tensor


@dataclass(frozen=True)
class TokenRecovery:
    """One text-inversion audit. Special tokens ([CLS], [SEP], padding) are never scored.

    Attributes:
        precision, recall, f1: of the recovered tokens against the batch's tokens, as sets for
            embedding-row recovery, as multisets (bags of words) for optimisation-based inversion.
        baseline_f1: the same F1 for a uniform random guess of as many tokens from the vocabulary.
        accuracy: share of positions whose token is recovered exactly (inversion only, else None).
        baseline_accuracy: the same for a uniform random token per position.
        recovered, true: the token ids compared.
        grad_distance: final cosine distance of the gradient match (inversion only).
    """

    precision: float
    recall: float
    f1: float
    baseline_f1: float
    recovered: tuple[int, ...]
    true: tuple[int, ...]
    accuracy: Optional[float] = None
    baseline_accuracy: Optional[float] = None
    grad_distance: Optional[float] = None


def gradient_from_update(update: NamedTensors, lr: float = 1.0) -> dict[str, torch.Tensor]:
    """The gradient of one local SGD step: -update / lr."""
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    return {n: -d.detach() / lr for n, d in update.items()}


# --- labels -----------------------------------------------------------------------------------


def infer_labels(grads: NamedTensors, batch_size: int, num_classes: int) -> tuple[int, ...]:
    """Labels of a batch from the gradient of the last linear layer (iDLG, Zhao et al. 2020).

    With cross-entropy, row i of that layer's gradient is (p_i - y_i) h: its bias entry is
    negative only at the true label, and without a bias the true row is the one pointing against
    all others. Exact for a batch of one. For larger batches the ``batch_size`` most negative bias
    entries are returned: right when the labels are distinct and the model is not yet confident.

    Raises:
        ValueError: no 2-D gradient with ``num_classes`` rows, or a batch > 1 without a bias.
    """
    weight, bias = _last_layer(grads, num_classes)
    if bias is not None:
        order = torch.argsort(bias.double(), stable=True)
        return tuple(int(c) for c in order[:batch_size])
    if batch_size != 1:
        raise ValueError("inferring the labels of a batch > 1 needs the last layer's bias gradient")
    rows = weight.double().reshape(num_classes, -1)
    against = ((rows @ rows.T) < 0).sum(1)
    return (int(torch.argmax(against)),)


def _attack_labels(source: LabelSource, grads: NamedTensors, true: torch.Tensor,
                   num_classes: int) -> Optional[torch.Tensor]:
    if source == "known":
        return true.long()
    if source == "learn":
        return None
    if source == "infer":
        return torch.tensor(infer_labels(grads, len(true), num_classes))
    raise ValueError(f"label_source must be 'infer', 'known' or 'learn', got {source!r}")


def _last_layer(grads: NamedTensors, num_classes: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    for name in reversed(list(grads)):
        g = grads[name]
        if g.dim() == 2 and g.shape[0] == num_classes:
            bias_name = name[: -len("weight")] + "bias" if name.endswith("weight") else None
            return g, grads.get(bias_name) if bias_name else None
    raise ValueError(f"no last-layer gradient with {num_classes} rows among {list(grads)[-4:]}: "
                     "the classifier head must travel to infer labels (or pass the labels)")


# --- gradient matching ------------------------------------------------------------------------


class _GradientMatch:
    """Cosine distance between the gradient of a loss and the observed gradient: over all
    tensors at once (Geiping et al. 2020), or averaged per tensor so that small tensors (LoRA
    factors next to a head) weigh as much as large ones. Tensors observed as all-zero carry no
    information and are skipped."""

    def __init__(self, params: Mapping[str, torch.nn.Parameter], target: NamedTensors, per_tensor: bool = False):
        missing = [n for n in target if n not in params]
        if missing:
            raise ValueError(f"observed gradients name parameters the model does not train: {missing[:3]}")
        names = [n for n in target if bool(target[n].any())]
        if not names:
            raise ValueError("the observed gradient is zero: there is nothing to invert")
        self.params = [params[n] for n in names]
        self.target = [target[n].detach().to(p.dtype) for n, p in zip(names, self.params)]
        self.per_tensor = per_tensor

    def __call__(self, loss: torch.Tensor) -> torch.Tensor:
        grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, self.params)]
        if self.per_tensor:
            return torch.stack([_cosine_distance([g], [t]) for g, t in zip(grads, self.target)]).mean()
        return _cosine_distance(grads, self.target)


def _cosine_distance(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    dot = sum((x * y).sum() for x, y in zip(a, b))
    norms = torch.sqrt(sum((x * x).sum() for x in a)) * torch.sqrt(sum((y * y).sum() for y in b))
    return 1 - dot / (norms + 1e-12)


def _classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with hard labels (int64) or soft label logits (float, DLG)."""
    if labels.dtype == torch.long:
        return torch.nn.functional.cross_entropy(logits, labels)
    soft = torch.softmax(labels, dim=-1)
    return -(soft * torch.log_softmax(logits, dim=-1)).sum(-1).mean()


Objective = Callable[[], "tuple[torch.Tensor, torch.Tensor]"]
"""() -> (total loss to minimise, gradient distance to report)."""


def _optimise(variables: list[torch.Tensor], objective: Objective, iterations: int, step_size: float,
              after_step: Callable[[], None] = lambda: None) -> tuple[list[torch.Tensor], float]:
    """Adam on signed gradients with step decay at 3/8, 5/8 and 7/8 of the run (Geiping et al.);
    returns the iterate with the lowest gradient distance (the attacker's own criterion) and it
    (inf when every distance was NaN)."""
    if iterations < 1 or step_size <= 0:
        raise ValueError(f"need iterations >= 1 and step_size > 0, got {iterations} and {step_size}")
    opt = torch.optim.Adam(variables, lr=step_size)
    milestones = [int(iterations * f) for f in (3 / 8, 5 / 8, 7 / 8)]
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)
    best, best_dist = [v.detach().clone() for v in variables], math.inf
    with _twice_differentiable_attention():
        for _ in range(iterations):
            best, best_dist = _step(variables, objective, opt, best, best_dist)
            sched.step()
            with torch.no_grad():
                after_step()
    return best, best_dist


def _step(variables: list[torch.Tensor], objective: Objective,
          opt: torch.optim.Optimizer, best: list[torch.Tensor], best_dist: float) -> tuple[list[torch.Tensor], float]:
    opt.zero_grad(set_to_none=True)
    total, dist = objective()
    if float(dist.detach()) < best_dist:  # the iterate the distance was measured at
        best, best_dist = [v.detach().clone() for v in variables], float(dist.detach())
    # Only the attack's variables: backward() would also pile second-order terms into the model's .grad.
    for v, g in zip(variables, torch.autograd.grad(total, variables)):
        v.grad = g.sign()
    opt.step()
    return best, best_dist


def _twice_differentiable_attention() -> Any:
    """Gradient matching differentiates a gradient; the fused CPU attention kernels have no
    second derivative, so attention runs on the plain math kernel here."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


# --- images -----------------------------------------------------------------------------------


def reconstruct_images(forward: Callable[[torch.Tensor], torch.Tensor], params: Mapping[str, torch.nn.Parameter],
                       grads: NamedTensors, shape: Sequence[int], labels: Optional[torch.Tensor], *,
                       iterations: int = 300, step_size: float = 0.1, tv_weight: float = 1e-2,
                       data_range: tuple[float, float] = (-1.0, 1.0),
                       seed: int = 0) -> tuple[torch.Tensor, float, torch.Tensor]:
    """Images whose gradient matches ``grads`` (Geiping et al. 2020); the attack itself, which
    never sees the true images.

    Args:
        forward: images -> logits, at the params the gradient was taken at.
        params: the parameters ``grads`` is the gradient of, by name.
        shape: (B, C, H, W) of the batch.
        labels: int64 (B,) labels, or None to learn soft labels jointly (DLG).
        tv_weight: weight of the total-variation prior; 1e-2 suits vit-tiny on 28x28 images
            (19.8 dB after 300 steps vs 15.1 dB at 1e-4), while an MLP, whose first layer pins
            the input down, does best with almost none.

    Returns:
        (images, cosine distance of their gradient, labels used: hard, or argmax of the soft ones).
    """
    match = _GradientMatch(params, grads)
    lo, hi = data_range
    gen = torch.Generator().manual_seed(seed)
    x = (torch.rand(tuple(shape), generator=gen) * (hi - lo) + lo).requires_grad_()
    soft = None if labels is not None else _soft_labels(lambda: forward(x.detach()), gen)

    def objective() -> tuple[torch.Tensor, torch.Tensor]:
        dist = match(_classification_loss(forward(x), labels if soft is None else soft))
        return dist + tv_weight * total_variation(x), dist

    variables = [x] if soft is None else [x, soft]
    best, dist = _optimise(variables, objective, iterations, step_size, after_step=lambda: x.clamp_(lo, hi))
    return best[0], dist, labels if soft is None else best[1].argmax(-1)


def _soft_labels(logits: Callable[[], torch.Tensor], gen: torch.Generator) -> torch.Tensor:
    """Learnable label logits shaped like the model's logits, one row per example (DLG)."""
    with torch.no_grad():
        shape = tuple(logits().shape)
    return torch.randn(shape, generator=gen).requires_grad_()


def image_inversion_audit(forward: Callable[[torch.Tensor], torch.Tensor], params: Mapping[str, torch.nn.Parameter],
                          grads: NamedTensors, images: torch.Tensor, labels: torch.Tensor,
                          label_source: LabelSource = "infer", *, data_range: tuple[float, float] = (-1.0, 1.0),
                          seed: int = 0, **attack: Any) -> InversionResult:
    """Run :func:`reconstruct_images` on the gradient of the batch (images, labels) and score it
    against the truth. ``attack`` passes iterations, step_size and tv_weight through."""
    with torch.no_grad():  # the number of classes, from a blank image
        num_classes = int(forward(torch.zeros_like(images[:1])).shape[-1])
    given = _attack_labels(label_source, grads, labels, num_classes)
    recon, dist, used = reconstruct_images(forward, params, grads, images.shape, given, data_range=data_range,
                                           seed=seed, **attack)
    recon = recon[match_order(recon, images)]
    span = data_range[1] - data_range[0]
    noise = torch.rand(images.shape, generator=torch.Generator().manual_seed(seed + 1)) * span + data_range[0]
    return InversionResult(
        psnr=float(psnr(recon, images, span).mean()), mse=float(((recon - images) ** 2).mean()),
        baseline_psnr=float(psnr(noise, images, span).mean()), labels=tuple(int(c) for c in used),
        label_accuracy=_multiset_overlap(used.tolist(), labels.tolist()) / len(labels),
        grad_distance=dist, reconstruction=recon,
    )


def audit_image_update(handle: ModelHandle, before: NamedTensors, update: NamedTensors, images: torch.Tensor,
                       labels: torch.Tensor, lr: float = 1.0, label_source: LabelSource = "infer",
                       **attack: Any) -> InversionResult:
    """Invert one client's update of an image model (e.g. vit-tiny). Loads ``before`` into the
    handle (its params stay so) and runs in eval mode: dropout masks of the client are unknown."""
    handle.set_params(before)
    with _eval_mode(handle.model):
        def forward(x: torch.Tensor) -> torch.Tensor:
            return _logits(handle.model(pixel_values=x))

        return image_inversion_audit(forward, handle.trainable, gradient_from_update(update, lr), images, labels,
                                     label_source, **attack)


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Per-image peak signal-to-noise ratio 10 log10(range^2 / MSE) in dB, shape (B,)."""
    mse = ((x.double() - y.double()) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(data_range**2 / mse)


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of vertically and horizontally neighbouring pixels."""
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()


def match_order(recon: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Permutation ``perm`` such that recon[perm] pairs with truth at the least total MSE (a
    reconstruction comes back in no particular order). Exhaustive up to 8 images, else scipy's
    Hungarian solver.
    """
    cost = ((truth.double().flatten(1)[:, None] - recon.double().flatten(1)[None]) ** 2).mean(-1).numpy()
    n = len(cost)
    if n <= 8:
        best = min(itertools.permutations(range(n)), key=lambda p: cost[np.arange(n), list(p)].sum())
        return torch.tensor(best)
    from scipy.optimize import linear_sum_assignment

    return torch.as_tensor(linear_sum_assignment(cost)[1])


# --- text -------------------------------------------------------------------------------------


def recover_token_set(embedding_update: torch.Tensor, rel_tol: float = 1e-6) -> tuple[int, ...]:
    """Ids of the embedding rows that changed: rows whose norm exceeds ``rel_tol`` times the
    largest row norm (a tolerance above 0 absorbs weight decay, which touches every row)."""
    norms = embedding_update.double().norm(dim=1)
    if float(norms.max()) == 0.0:
        return ()
    return tuple(int(i) for i in torch.nonzero(norms > rel_tol * norms.max()).flatten())


def audit_embedding_update(handle: ModelHandle, update: NamedTensors, batch: Mapping[str, torch.Tensor],
                           rel_tol: float = 1e-6, seed: int = 0) -> TokenRecovery:
    """Token-set recovery from the word-embedding rows of a full fine-tuning update.

    Args:
        handle: the text model (its embedding matrix must train and travel).
        update: the client's update (or gradient), by trainable name.
        batch: what the client trained on: ``input_ids`` and ``attention_mask``.

    Raises:
        ValueError: the word embeddings are not among the updated parameters.
    """
    emb = handle.model.get_input_embeddings().weight
    name = next((n for n, p in handle.trainable.items() if p is emb and n in update), None)
    if name is None:
        raise ValueError("the word embeddings do not travel in this update (an adapter such as LoRA keeps them "
                         "home): use audit_lora_update, which inverts the adapter gradients instead")
    special = set(handle.tokenizer.all_special_ids)
    recovered = [t for t in recover_token_set(update[name], rel_tol) if t not in special]
    true = sorted(set(_content_tokens(batch, special)))
    return _score(recovered, true, emb.shape[0], special, seed, as_set=True)


def reconstruct_tokens(forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                       params: Mapping[str, torch.nn.Parameter], grads: NamedTensors, embeddings: torch.Tensor,
                       attention_mask: torch.Tensor, labels: Optional[torch.Tensor], *, iterations: int = 300,
                       step_size: float = 0.3, norm_weight: float = 1.0, seed: int = 0) -> tuple[torch.Tensor, float]:
    """Token ids whose adapter gradient matches ``grads``: continuous input embeddings are
    optimised by gradient matching with a prior pulling their norms to the vocabulary's mean
    norm, then each position takes the token with the most cosine-similar embedding.

    Args:
        forward: (input embeddings (B, L, d), attention mask) -> logits of a classifier.
        embeddings: (V, d) the model's word-embedding matrix.
        attention_mask: (B, L) the batch's shape (the adversary is given the lengths).
        labels: int64 (B,) or None to learn soft labels.
        step_size: Adam's step, in units of the embedding matrix's standard deviation.
        norm_weight: weight of the norm prior.

    Returns:
        ((B, L) token ids, cosine distance of the best match).
    """
    match = _GradientMatch(params, grads, per_tensor=True)
    table = embeddings.detach()
    mean_norm = table.norm(dim=1).mean()
    gen = torch.Generator().manual_seed(seed)
    b, length = attention_mask.shape
    scale = table.std()  # optimise in units of the embeddings' spread, so step_size is scale-free
    z = torch.randn((b, length, table.shape[1]), generator=gen).requires_grad_()
    soft = None if labels is not None else _soft_labels(lambda: forward(z.detach() * scale, attention_mask), gen)

    def objective() -> tuple[torch.Tensor, torch.Tensor]:
        dummy = z * scale
        dist = match(_classification_loss(forward(dummy, attention_mask), labels if soft is None else soft))
        prior = ((dummy.norm(dim=-1) - mean_norm) ** 2).mean() / mean_norm**2
        return dist + norm_weight * prior, dist

    best, dist = _optimise([z] if soft is None else [z, soft], objective, iterations, step_size)
    unit = torch.nn.functional.normalize(table, dim=1)
    ids = (torch.nn.functional.normalize(best[0], dim=-1) @ unit.T).argmax(-1)
    return ids, dist


def audit_lora_update(handle: ModelHandle, before: NamedTensors, update: NamedTensors,
                      batch: Mapping[str, torch.Tensor], lr: float = 1.0, label_source: LabelSource = "infer",
                      seed: int = 0, **attack: Any) -> TokenRecovery:
    """Optimisation-based token recovery from an update in which the embeddings do not travel
    (LoRA factors and the head; works for any trainable set). Loads ``before`` into the handle.

    Args:
        batch: the client's classification batch: ``input_ids``, ``attention_mask``, ``labels``.
        attack: iterations, step_size and norm_weight for :func:`reconstruct_tokens`.
    """
    if batch["labels"].dim() != 1:
        raise ValueError("token inversion needs a classification batch (one label per text); "
                         f"got labels of shape {tuple(batch['labels'].shape)}")
    handle.set_params(before)
    grads = gradient_from_update(update, lr)
    table = handle.model.get_input_embeddings().weight
    mask = batch["attention_mask"]
    with _eval_mode(handle.model):
        def forward(e: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
            return _logits(handle.model(inputs_embeds=e, attention_mask=m))

        with torch.no_grad():  # the number of classes, from blank embeddings
            num_classes = int(forward(torch.zeros((1, *mask.shape[1:], table.shape[1])), mask[:1]).shape[-1])
        labels = _attack_labels(label_source, grads, batch["labels"], num_classes)
        ids, dist = reconstruct_tokens(forward, handle.trainable, grads, table, mask, labels, seed=seed, **attack)
    return _score_positions(ids, batch, set(handle.tokenizer.all_special_ids), table.shape[0], seed, dist)


def _score_positions(ids: torch.Tensor, batch: Mapping[str, torch.Tensor], special: set[int], vocab: int,
                     seed: int, dist: float) -> TokenRecovery:
    """Bag and position scores of recovered ids on the batch's real, non-special positions."""
    truth = batch["input_ids"]
    scored = (batch["attention_mask"] == 1) & ~torch.isin(truth, torch.tensor(sorted(special)))
    recovered, true = ids[scored].tolist(), truth[scored].tolist()
    bags = _score(recovered, true, vocab, special, seed, as_set=False)
    guess = _random_tokens(len(true), vocab, special, seed, replace=True)
    hits = float(np.mean(np.asarray(recovered) == np.asarray(true))) if true else 0.0
    base_hits = float(np.mean(np.asarray(guess) == np.asarray(true))) if true else 0.0
    return replace(bags, accuracy=hits, baseline_accuracy=base_hits, grad_distance=dist)


def bag_scores(recovered: Iterable[int], true: Iterable[int]) -> tuple[float, float, float]:
    """(precision, recall, F1) of two bags (multisets) of token ids; pass sets for set scores."""
    rec, tru = list(recovered), list(true)
    hit = _multiset_overlap(rec, tru)
    precision = hit / len(rec) if rec else 0.0
    recall = hit / len(tru) if tru else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def _score(recovered: list[int], true: list[int], vocab: int, special: set[int], seed: int,
           as_set: bool) -> TokenRecovery:
    p, r, f1 = bag_scores(recovered, true)
    guess = _random_tokens(len(recovered), vocab, special, seed, replace=not as_set)
    return TokenRecovery(precision=p, recall=r, f1=f1, baseline_f1=bag_scores(guess, true)[2],
                         recovered=tuple(recovered), true=tuple(true))


def _random_tokens(n: int, vocab: int, special: set[int], seed: int, replace: bool) -> list[int]:
    allowed = np.setdiff1d(np.arange(vocab), np.fromiter(special, dtype=np.int64, count=len(special)))
    return np.random.default_rng(seed).choice(allowed, size=min(n, len(allowed)), replace=replace).tolist()


def _content_tokens(batch: Mapping[str, torch.Tensor], special: set[int]) -> list[int]:
    ids = batch["input_ids"][batch["attention_mask"] == 1].tolist()
    return [t for t in ids if t not in special]


def _multiset_overlap(a: Iterable[int], b: Iterable[int]) -> int:
    return sum((Counter(a) & Counter(b)).values())


def _logits(out: Any) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out


class _eval_mode:
    """Eval mode for the block, then the model's previous mode."""

    def __init__(self, model: Any):
        self.model, self.was_training = model, model.training

    def __enter__(self) -> None:
        self.model.eval()

    def __exit__(self, *exc: Any) -> None:
        self.model.train(self.was_training)
