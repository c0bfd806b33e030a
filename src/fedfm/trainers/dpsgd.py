"""Sample-level differential privacy inside each client: DP-SGD (Abadi et al. 2016) via Opacus.

Opacus computes per-example gradients (``GradSampleModule``) and its ``DPOptimizer`` clips each
example's gradient to ``max_grad_norm`` and adds Gaussian noise of std ``noise_multiplier *
max_grad_norm`` to their sum before the step. We do not hand the model to Opacus'
``PrivacyEngine``: it would replace our data loader and wrap the Hugging Face model for good.
Instead the shared model is wrapped for one client's turn only and its hooks are removed
afterwards, so the same model object serves the next client, the server's central stages and
evaluation unchanged. Only trainable parameters (the adapter and head) get per-example
gradients; the frozen base costs nothing extra.

Accounting is per client and done by dp-accounting at the server (fedfm.privacy): each local
step is a sampled Gaussian mechanism with rate ``batch_size / client examples`` (our batches are
a shuffled pass, accounted as Poisson sampling at that rate, the usual approximation), so a
client's epsilon follows from ``noise_multiplier``, that rate and the steps it has taken.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fedfm.trainers.local import LocalTrainer, make_optimizer
from fedfm.types import ClientTask


@dataclass
class DPSGDTrainer(LocalTrainer):
    """LocalTrainer with per-example clipping and noise (Opacus)."""

    noise_multiplier: float = 1.0
    max_grad_norm: float = 1.0

    def _prepare(self, task: ClientTask, params: list[torch.nn.Parameter]) -> tuple[Any, Any, Any]:
        import warnings

        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        # Inputs (token ids) never require grad, so torch warns on every backward; it is harmless.
        warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)

        module = GradSampleModule(self.handle.model, batch_first=True, loss_reduction="mean", strict=False)
        noise = torch.Generator().manual_seed(task.seed)  # reproducible noise, separate from data order
        optimizer = DPOptimizer(make_optimizer(self.cfg, params), noise_multiplier=self.noise_multiplier,
                                max_grad_norm=self.max_grad_norm, expected_batch_size=self.cfg.batch_size,
                                generator=noise)

        def release() -> None:
            module.remove_hooks()
            for p in params:
                p.grad_sample = None  # type: ignore[attr-defined]
                p.grad = None

        return module, optimizer, release

    def train(self, task: ClientTask) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        params, metrics = super().train(task)
        n = max(metrics["num_examples"], 1.0)
        metrics["dp_sample_rate"] = min(1.0, self.cfg.batch_size / n)
        return params, metrics
