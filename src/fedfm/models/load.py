"""Build a model for a task with its tokenizer."""

from __future__ import annotations

from typing import Any

from fedfm.errors import ModelError
from fedfm.models.presets import ModelPreset, resolve


def load_tokenizer(preset: ModelPreset, name: str) -> Any:
    """The preset's tokenizer, or None for image models."""
    from transformers import AutoTokenizer

    if preset.tokenizer is None:
        return None
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
    presets, every weight) are initialized from ``seed``.

    Raises:
        ModelError: unknown name, missing package, or a model/task pair that does not fit
            (e.g. masked LM on a decoder, causal LM on a bidirectional encoder).
    """
    import torch
    import transformers
    from transformers.utils import logging as hf_logging

    preset = resolve(name)
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
