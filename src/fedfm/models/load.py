"""Build a model for a task with its tokenizer.

transformers loads only for transformers models: presets that build a plain torch module
(``ModelPreset.build``, e.g. ``mlp``) never import it, which keeps their start-up short.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional

import torch

from fedfm.errors import ModelError
from fedfm.models.presets import ModelPreset, resolve


def load_tokenizer(preset: ModelPreset, name: str) -> Any:
    """The preset's tokenizer, or None for image models."""
    if preset.tokenizer is None:
        return None
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(preset.tokenizer()))
    except ModelError:
        raise
    except Exception as e:
        raise ModelError(_unreachable(name, e)) from None
    if tok.pad_token is None:  # decoders often ship without one
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


TASK_HEADS = {
    "classify": "AutoModelForSequenceClassification",
    "mlm": "AutoModelForMaskedLM",
    "clm": "AutoModelForCausalLM",
}


def load_classifier(name: str, num_labels: int, seed: int) -> tuple[Any, Any]:
    """(model with a fresh sequence-classification head, tokenizer); see :func:`load_model`."""
    return load_model(name, "classify", seed, num_labels)


def load_model(name: str, task: str, seed: int, num_labels: int = 2) -> tuple[Any, Any]:
    """(model with the head ``task`` needs, tokenizer). New heads (and, for random-init
    presets, every weight) are initialized from ``seed``. Presets with ``build`` (plain torch
    image models, e.g. ``mlp``) return (their module, None) without importing transformers.

    Raises:
        ModelError: unknown name, missing package, or a model/task pair that does not fit
            (e.g. masked LM on a decoder, causal LM on a bidirectional encoder).
    """
    preset = resolve(name)
    if preset.build is not None:
        return _build_plain(preset.build, name, task, seed, num_labels), None
    import transformers
    from transformers.utils import logging as hf_logging

    tok = load_tokenizer(preset, name)
    hf_logging.set_verbosity_error()  # "newly initialized head" is expected here
    hf_logging.disable_progress_bar()  # fedfm draws its own progress
    if tok is None and task != "classify":
        raise ModelError(f"model {name!r} takes images; task {task!r} is for text models")
    auto = getattr(transformers, "AutoModelForImageClassification" if tok is None else TASK_HEADS[task])
    extra = {"num_labels": num_labels} if task == "classify" else {}
    torch.manual_seed(seed)
    try:
        if preset.config is not None:
            cfg = preset.config(tok)
            for k, v in extra.items():
                setattr(cfg, k, v)
            if tok is not None:
                check_task_fits(name, task, cfg)
            model = auto.from_config(cfg)
        else:
            cfg = transformers.AutoConfig.from_pretrained(str(preset.source()))
            check_task_fits(name, task, cfg)
            model = auto.from_pretrained(str(preset.source()), dtype=torch.float32, **extra)
    except ModelError:
        raise
    except ValueError as e:
        raise ModelError(f"model {name!r} has no architecture for task {task!r}: {str(e)[:300]}") from None
    except Exception as e:
        raise ModelError(_unreachable(name, e)) from None
    if tok is not None and getattr(model.config, "pad_token_id", 0) is None:
        model.config.pad_token_id = tok.pad_token_id
    return model, tok


def _build_plain(build: Callable[[int, int], Any], name: str, task: str, seed: int, num_labels: int) -> Any:
    """A preset's plain torch image classifier (see ``ModelPreset.build``), for task classify only."""
    if task != "classify":
        raise ModelError(f"model {name!r} is a plain image classifier with no language-model head; task "
                         f"{task!r} is for text models (e.g. tiny-bert for 'mlm', tiny-llama for 'clm'); "
                         "allowed task for it: classify")
    return build(num_labels, seed)


@dataclass
class MLPConfig:
    """What fedfm (``num_labels``) and peft (``model_type``, ``to_dict``) read from ``model.config``."""

    in_features: int
    hidden: int
    num_labels: int
    model_type: str = "mlp"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ClassifierOutput:
    """A classifier's forward result, as transformers' SequenceClassifierOutput names it.

    Attributes:
        loss: mean cross-entropy over the batch when labels were given, else None.
        logits: (batch, num_labels) unnormalized class scores.
    """

    loss: Optional[torch.Tensor]
    logits: torch.Tensor


class MLPClassifier(torch.nn.Module):
    """Flattened greyscale image -> Linear(in_features, hidden) -> ReLU -> Linear(hidden, num_labels).

    The two layers are named ``hidden`` and ``classifier``: adapter ``head`` trains the
    classifier alone, LoRA wraps ``hidden`` (the preset's default target).

    Args:
        in_features: pixels per image (64 for 8x8 digits); fixed at build time, checked per batch.
        hidden: width of the hidden layer.
        num_labels: classes.
    """

    def __init__(self, in_features: int, hidden: int, num_labels: int) -> None:
        super().__init__()
        self.config = MLPConfig(in_features=in_features, hidden=hidden, num_labels=num_labels)
        self.hidden = torch.nn.Linear(in_features, hidden)
        self.classifier = torch.nn.Linear(hidden, num_labels)

    def forward(self, pixel_values: torch.Tensor, labels: Optional[torch.Tensor] = None,
                **ignored: Any) -> ClassifierOutput:
        """Logits of ``pixel_values`` (N, 1, H, W); the mean cross-entropy too when ``labels`` are given.

        Raises:
            ModelError: the images do not have ``in_features`` pixels.
        """
        x = pixel_values.flatten(1)
        want = self.config.in_features
        if x.shape[1] != want:
            side = math.isqrt(want)
            square = f" ({side}x{side})" if side * side == want else ""
            got = "x".join(str(d) for d in pixel_values.shape[2:])
            raise ModelError(
                f"the MLP classifier expects images of {want} pixels{square} but got {x.shape[1]} pixels per "
                f"image ({got}); model 'mlp' takes 8x8 images such as dataset digits; for 28x28 images use "
                "an image model of that size (vit-tiny, vit-small)")
        logits = self.classifier(torch.relu(self.hidden(x)))
        loss = None if labels is None else torch.nn.functional.cross_entropy(logits, labels)
        return ClassifierOutput(loss=loss, logits=logits)


def check_task_fits(name: str, task: str, cfg: Any) -> None:
    """Refuse model/task pairs that would train something meaningless, with the reason."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

    kind = cfg.model_type
    if task == "mlm" and kind not in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        raise ModelError(f"model {name!r} ({kind}) is a causal decoder with no masked-LM head; "
                         "use task 'clm' for it, or an encoder (e.g. minilm-l6, tiny-bert) for 'mlm'")
    encoder_only = kind in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(cfg, "is_decoder", False)
    if task == "clm" and (encoder_only or kind not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        raise ModelError(f"model {name!r} ({kind}) is a bidirectional encoder: causal LM would let it see "
                         "the tokens it predicts; use task 'mlm' for it, or a decoder (e.g. tiny-llama) for 'clm'")


def _unreachable(name: str, err: Exception) -> str:
    from fedfm.models.presets import PRESETS

    return (
        f"cannot load model {name!r}: it is not a preset ({', '.join(PRESETS.names())}), not a local "
        f"directory, and the Hugging Face hub could not provide it ({type(err).__name__}: {str(err)[:200]})"
    )
