"""Tiny, real transformers models and tokenizers, built offline and saved with
``save_pretrained`` so tests load them through the same loaders as hub checkpoints."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metamorph_core.config import ComponentSpec, MetaMorphConfig
from metamorph_core.testing import chat_templates

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


@dataclass(frozen=True)
class TinyFamily:
    """How a tiny model of one transformers family is built: its config overrides (with
    ``model_type``), the tokenizer's bos/eos/pad tokens, special tokens the family's chat
    template needs (added after the trained vocabulary, so the families without any share one
    vocabulary), extra embedding rows beyond the tokenizer, and the family's published chat
    template (attached when asked for: :mod:`metamorph_core.testing.chat_templates`)."""

    config: dict[str, Any]
    bos: str | None
    eos: str
    pad: str
    extra_rows: int = 0
    specials: tuple[str, ...] = ()
    chat_template: str | None = None


_SLIDING = {"sliding_window": 16}  # short, so that tests cross it
TINY_FAMILIES: dict[str, TinyFamily] = {
    "llama": TinyFamily(
        {"model_type": "llama"},
        "<|begin_of_text|>",
        "<|eot_id|>",
        "<|end_of_text|>",
        chat_template=chat_templates.LLAMA3,
    ),
    "qwen2": TinyFamily(
        {"model_type": "qwen2", "tie_word_embeddings": True},
        None,
        "<|im_end|>",
        "<|endoftext|>",
        extra_rows=29,
        chat_template=chat_templates.QWEN2,
    ),
    "qwen3": TinyFamily(
        {"model_type": "qwen3", "head_dim": 8}, None, "<|im_end|>", "<|endoftext|>"
    ),
    "qwen2_moe": TinyFamily(
        {
            "model_type": "qwen2_moe",
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 16,
            "shared_expert_intermediate_size": 32,
        },
        None,
        "<|im_end|>",
        "<|endoftext|>",
        chat_template=chat_templates.QWEN2,
    ),
    "mistral": TinyFamily(
        {"model_type": "mistral", "head_dim": 8, **_SLIDING},
        "<s>",
        "</s>",
        "</s>",
        specials=("<s>", "</s>", "[INST]", "[/INST]"),
        chat_template=chat_templates.MISTRAL,
    ),
    "gemma3_text": TinyFamily(
        {
            "model_type": "gemma3_text",
            "head_dim": 8,
            "query_pre_attn_scalar": 8,
            "layer_types": ["sliding_attention", "full_attention"],
            **_SLIDING,
        },
        "<bos>",
        "<eos>",
        "<pad>",
        specials=("<bos>", "<eos>", "<pad>", "<start_of_turn>", "<end_of_turn>"),
        chat_template=chat_templates.GEMMA3,
    ),
    "phi3": TinyFamily(
        {"model_type": "phi3"},
        "<s>",
        "<|endoftext|>",
        "<|endoftext|>",
        specials=("<s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
        chat_template=chat_templates.PHI3,
    ),
    # Pythia: a base model, no chat template
    "gpt_neox": TinyFamily(
        {"model_type": "gpt_neox"}, "<|endoftext|>", "<|endoftext|>", "<|endoftext|>"
    ),
    # SmolLM2: a Llama with tied embeddings and ChatML
    "smollm": TinyFamily(
        {"model_type": "llama", "tie_word_embeddings": True},
        None,
        "<|im_end|>",
        "<|endoftext|>",
        chat_template=chat_templates.SMOLLM2,
    ),
}


def build_tiny_tokenizer(
    family: str = "llama", vocab_size: int = 320, chat_template: bool = False
) -> Any:
    """A byte-level BPE tokenizer trained on a small fixed corpus, with the special tokens of
    the ``llama3`` and ``chatml`` templates and of ``family``'s chat template; with
    ``chat_template``, that template too (families without one stay without). Deterministic."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    fam = _family(family)
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
    new = [t for t in fam.specials if t not in _SPECIALS]
    if new:
        tok.add_special_tokens(new)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=fam.bos, eos_token=fam.eos, pad_token=fam.pad
    )
    if chat_template and fam.chat_template is not None:
        tokenizer.chat_template = fam.chat_template
    return tokenizer


def _family(name: str) -> TinyFamily:
    if name not in TINY_FAMILIES:
        raise ValueError(f"unknown tiny family '{name}'; use one of {sorted(TINY_FAMILIES)}")
    return TINY_FAMILIES[name]


def save_tiny_backbone(
    path: str | Path,
    family: str = "llama",
    hidden_size: int = 32,
    num_layers: int = 2,
    seed: int = 0,
    chat_template: bool = False,
    **config_overrides: Any,
) -> Path:
    """Save a random ``family`` causal LM (a key of :data:`TINY_FAMILIES`: ``qwen2`` has an
    embedding matrix padded beyond its tokenizer) and its tokenizer to ``path`` with
    ``save_pretrained``; ``chat_template`` gives the tokenizer the family's published one."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    fam = _family(family)
    tokenizer = build_tiny_tokenizer(family, chat_template=chat_template)
    kwargs = {
        "vocab_size": len(tokenizer) + fam.extra_rows,
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        **{k: v for k, v in fam.config.items() if k != "model_type"},
        **config_overrides,
    }
    config = AutoConfig.for_model(fam.config["model_type"], **kwargs)
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
