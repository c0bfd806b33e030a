"""Build a model for a task with its tokenizer."""

from __future__ import annotations

from typing import Any

from fedfm.errors import ModelError
from fedfm.models.presets import ModelPreset, resolve


def load_tokenizer(preset: ModelPreset, name: str) -> Any:
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


def load_classifier(name: str, num_labels: int, seed: int) -> tuple[Any, Any]:
    """(model with a fresh sequence-classification head, tokenizer). The head (and, for
    random-init presets, every weight) is initialized from ``seed``.

    Raises:
        ModelError: unknown name, missing package, or an architecture with no classification head.
    """
    import torch
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    preset = resolve(name)
    tok = load_tokenizer(preset, name)
    hf_logging.set_verbosity_error()  # "newly initialized classifier" is expected here
    hf_logging.disable_progress_bar()  # fedfm draws its own progress
    torch.manual_seed(seed)
    try:
        if preset.config is not None:
            cfg = preset.config(tok)
            cfg.num_labels = num_labels
            model = AutoModelForSequenceClassification.from_config(cfg)
        else:
            model = AutoModelForSequenceClassification.from_pretrained(
                str(preset.source()), num_labels=num_labels, dtype=torch.float32
            )
    except ModelError:
        raise
    except ValueError as e:
        raise ModelError(f"model {name!r} cannot classify sequences: {e}") from None
    except Exception as e:
        raise ModelError(_unreachable(name, e)) from None
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    return model, tok


def _unreachable(name: str, err: Exception) -> str:
    from fedfm.models.presets import PRESETS

    return (
        f"cannot load model {name!r}: it is not a preset ({', '.join(PRESETS.names())}), not a local "
        f"directory, and the Hugging Face hub could not provide it ({type(err).__name__}: {str(err)[:200]})"
    )
