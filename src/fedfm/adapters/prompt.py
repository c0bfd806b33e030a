"""Prompt-learning adapters through peft: only the prompt model (and the task head) train and travel.

- ``prompt``: soft prompt tuning (Lester et al. 2021): virtual token embeddings.
- ``ptuning``: a prompt generator (P-tuning, Liu et al. 2021): an MLP/LSTM prompt encoder
  produces the virtual tokens; the encoder's weights are what is federated.
- ``prefix``: prefix tuning (Li & Liang 2021): per-layer key/value prefixes.

The frozen foundation model never leaves the server or the client. With public data at
the server, a central phase tunes the same prompt model between federated rounds (the
hybrid of the FFM lifecycle) because central stages train exactly the trainable params.
"""

from __future__ import annotations

from typing import Any

from fedfm.adapters.base import ADAPTERS, has_head


class _PromptLearning:
    """Shared wiring: peft's task type for sequence classification keeps the classifier
    head trainable (modules_to_save), as a fresh head has to be learned."""

    def peft_config(self, cfg: Any, **common: Any) -> Any:
        raise NotImplementedError  # each subclass returns its peft config

    def apply(self, model: Any, cfg: Any, preset: Any) -> Any:
        from peft import TaskType, get_peft_model

        if preset.tokenizer is None:
            from fedfm.errors import ConfigError

            raise ConfigError(f"adapter.method={cfg.method!r} prepends learned tokens to a text model's input; "
                              "this model takes images. Allowed here: full, head, lora")

        task = TaskType.SEQ_CLS if has_head(model) else TaskType.CAUSAL_LM
        common = {"task_type": task, "num_virtual_tokens": cfg.virtual_tokens}
        return get_peft_model(model, self.peft_config(cfg, **common))


class PromptTuning(_PromptLearning):
    def peft_config(self, cfg: Any, **common: Any) -> Any:
        from peft import PromptTuningConfig

        return PromptTuningConfig(**common)


class PTuning(_PromptLearning):
    def peft_config(self, cfg: Any, **common: Any) -> Any:
        from peft import PromptEncoderConfig

        return PromptEncoderConfig(encoder_hidden_size=cfg.encoder_hidden, **common)


class PrefixTuning(_PromptLearning):
    def peft_config(self, cfg: Any, **common: Any) -> Any:
        from peft import PrefixTuningConfig

        return PrefixTuningConfig(**common)


ADAPTERS.register("prompt")(PromptTuning())
ADAPTERS.register("ptuning")(PTuning())
ADAPTERS.register("prefix")(PrefixTuning())
