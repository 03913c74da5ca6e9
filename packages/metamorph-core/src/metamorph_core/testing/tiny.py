"""Tiny, real transformers models and tokenizers, built offline and saved with
``save_pretrained`` so tests load them through the same loaders as hub checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from metamorph_core.config import ComponentSpec, MetaMorphConfig

_CORPUS = [
    "a red square on the left",
    "a blue circle in the middle",
    "a green triangle at the top",
    "what colour is the shape?",
    "the shape is red.",
    "generate an image of a yellow star",
    "here is an image based on your request:",
    "grass is green and the sky is blue",
    "a triangle has three sides, a square has four sides",
    "two plus three is five",
    "You are a helpful assistant.",
    "system user assistant",
    "0 1 2 3 4 5 6 7 8 9",
    "Describe the image. It shows a small purple hexagon at the bottom right.",
]
_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
]

# family -> (transformers config overrides, bos, eos, pad, extra embedding rows beyond tokenizer)
TINY_FAMILIES: dict[str, tuple[dict[str, Any], str | None, str, str, int]] = {
    "llama": ({"model_type": "llama"}, "<|begin_of_text|>", "<|eot_id|>", "<|end_of_text|>", 0),
    "qwen2": (
        {"model_type": "qwen2", "tie_word_embeddings": True},
        None,
        "<|im_end|>",
        "<|endoftext|>",
        29,
    ),
    "qwen3": ({"model_type": "qwen3", "head_dim": 8}, None, "<|im_end|>", "<|endoftext|>", 0),
}


def build_tiny_tokenizer(family: str = "llama", vocab_size: int = 320) -> Any:
    """A byte-level BPE tokenizer trained on a small fixed corpus, with the special tokens of
    the ``llama3`` and ``chatml`` templates. Deterministic."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    _, bos, eos, pad, _ = TINY_FAMILIES[family]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad
    )


def save_tiny_backbone(
    path: str | Path,
    family: str = "llama",
    hidden_size: int = 32,
    num_layers: int = 2,
    seed: int = 0,
    **config_overrides: Any,
) -> Path:
    """Save a random ``family`` causal LM (``llama``, ``qwen2`` with an embedding matrix padded
    beyond its tokenizer, ``qwen3``) and its tokenizer to ``path`` with ``save_pretrained``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if family not in TINY_FAMILIES:
        raise ValueError(f"unknown tiny family '{family}'; use one of {sorted(TINY_FAMILIES)}")
    overrides, _, _, _, extra_rows = TINY_FAMILIES[family]
    tokenizer = build_tiny_tokenizer(family)
    kwargs = {
        "vocab_size": len(tokenizer) + extra_rows,
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        **{k: v for k, v in overrides.items() if k != "model_type"},
        **config_overrides,
    }
    config = AutoConfig.for_model(overrides["model_type"], **kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    path = Path(path)
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


def tiny_model_config(backbone_dir: str | Path, **overrides: Any) -> MetaMorphConfig:
    """A :class:`MetaMorphConfig` of the tiny encoder and a saved tiny backbone; the template
    follows the backbone family (``llama3`` or ``chatml``)."""
    import json

    model_type = json.loads((Path(backbone_dir) / "config.json").read_text())["model_type"]
    template = "llama3" if model_type == "llama" else "chatml"
    fields: dict[str, Any] = {
        "encoder": ComponentSpec(
            "tiny-patch", {"image_size": 16, "patch_size": 4, "hidden_size": 24, "num_tokens": 4}
        ),
        "backbone": ComponentSpec("hf-causal-lm", {"pretrained": str(backbone_dir)}),
        "template": ComponentSpec(template),
        **overrides,
    }
    return MetaMorphConfig(**fields)
