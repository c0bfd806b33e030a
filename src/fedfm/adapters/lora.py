"""LoRA (Hu et al. 2022) through Hugging Face peft: only the low-rank factors (and,
by default, the task head) train and travel."""

from __future__ import annotations

from typing import Any

from fedfm.adapters.base import ADAPTERS, has_head, head_names
from fedfm.errors import ConfigError


class Lora:
    def apply(self, model: Any, cfg: Any, preset: Any) -> Any:
        from peft import LoraConfig, get_peft_model

        targets = cfg.targets or list(preset.lora_targets)
        if not targets:
            raise ConfigError(
                "adapter.targets must name the modules LoRA wraps for this model "
                "(e.g. [\"query\", \"value\"] for BERT, [\"q_proj\", \"v_proj\"] for Llama)"
            )
        present = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
        missing = [t for t in targets if t not in present]
        if missing:
            raise ConfigError(
                f"adapter.targets {missing} are not modules of this model; "
                f"linear modules it has: {', '.join(sorted(_linear_names(model)))}"
            )
        lora = LoraConfig(
            r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
            modules_to_save=head_names(model) if cfg.train_head and has_head(model) else None,
        )
        model = get_peft_model(model, lora)
        if getattr(cfg, "aggregation", "naive") == "ffa":
            from fedfm.adapters.lora_aggregation import ffa_trainable

            # FFA-LoRA: A stays at peft's seeded initialization on every client and at the server
            # (the model is built from the run's seed everywhere), so it never needs to travel.
            for name, p in model.named_parameters():
                if p.requires_grad and not ffa_trainable(name):
                    p.requires_grad_(False)
        return model


def _linear_names(model: Any) -> set[str]:
    import torch

    return {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


ADAPTERS.register("lora")(Lora())
