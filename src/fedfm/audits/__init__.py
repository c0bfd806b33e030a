"""Leakage audits: measure what a client's update or a trained model reveals about its data.

Simulation only: runtime code never imports this package. Every audit is a plain function of a
model (a :class:`~fedfm.models.handle.ModelHandle`, or a forward function and its parameters),
parameters, an observed update and the data it came from, and returns a frozen result dataclass
of success numbers next to a baseline that knows nothing, so a report can show the leak as the gap.

Gradient inversion (:mod:`fedfm.audits.inversion`; an honest-but-curious server that knows the
params it sent and sees one client's update):

- :func:`audit_image_update` -> :class:`InversionResult` (PSNR and MSE of the reconstruction vs
  a random-image baseline; labels by iDLG). Lower level: :func:`image_inversion_audit` and
  :func:`reconstruct_images` take any ``forward(images) -> logits``.
- :func:`audit_embedding_update` -> :class:`TokenRecovery`: the batch's token set read off the
  non-zero word-embedding rows of a full fine-tuning update (exact; precision/recall/F1).
- :func:`audit_lora_update` -> :class:`TokenRecovery`: tokens recovered by inverting the adapter
  (e.g. LoRA + head) gradient; position accuracy and bag-of-words F1 vs a random guess.

Membership inference (:mod:`fedfm.audits.membership`; an adversary with the final model):

- :func:`example_stats` -> :class:`ExampleStats`: per-example loss and logit-scaled confidence of
  a handle on tokenized texts, LM texts or images (batched, no gradients).
- :func:`loss_threshold_attack` -> :class:`MembershipResult` (Yeom et al. 2018): AUC, TPR at 1%
  FPR, membership advantage.
- :func:`lira_attack` -> :class:`LiraResult` (Carlini et al. 2022): shadow models from a caller's
  ``train_fn(indices) -> stat_fn``; offline (OUT Gaussians) or online (likelihood ratio).
- :func:`auc`, :func:`roc_curve`, :func:`score_attack`: the scoring, usable on any scores.

From a run directory an audit needs: for inversion, the global params a client received
(``before``), that client's update (delta, or its gradient with lr=1), and the batch it trained on
(in simulation, the client's partition indices and seed give it); for membership inference, the
final params, the members (clients' training indices) and non-members (test indices).
"""

from fedfm.audits.inversion import (
    InversionResult,
    TokenRecovery,
    audit_embedding_update,
    audit_image_update,
    audit_lora_update,
    bag_scores,
    gradient_from_update,
    image_inversion_audit,
    infer_labels,
    match_order,
    psnr,
    reconstruct_images,
    reconstruct_tokens,
    recover_token_set,
    total_variation,
)
from fedfm.audits.membership import (
    ExampleStats,
    GaussianFit,
    LiraResult,
    MembershipResult,
    auc,
    example_stats,
    fit_gaussians,
    lira_attack,
    lira_scores,
    loss_threshold_attack,
    roc_curve,
    score_attack,
    shadow_splits,
)

__all__ = [
    "ExampleStats", "GaussianFit", "InversionResult", "LiraResult", "MembershipResult", "TokenRecovery",
    "audit_embedding_update", "audit_image_update", "audit_lora_update", "auc", "bag_scores", "example_stats",
    "fit_gaussians", "gradient_from_update", "image_inversion_audit", "infer_labels", "lira_attack", "lira_scores",
    "loss_threshold_attack", "match_order", "psnr", "reconstruct_images", "reconstruct_tokens", "recover_token_set",
    "roc_curve", "score_attack", "shadow_splits", "total_variation",
]
