"""Tokenizers trained on a project's own text with the ``tokenizers`` library, for language
models and encoders pretrained from scratch (no hub download)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

# chatml's markers (the `chatml` template), so a model pretrained with this tokenizer can be
# instruction-tuned with that template; <|endoftext|> pads
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    special_tokens: tuple[str, ...] = SPECIAL_TOKENS,
    eos_token: str = "<|im_end|>",
    pad_token: str = "<|endoftext|>",
) -> Any:
    """A byte-level BPE tokenizer (any text encodes; no unknown tokens) trained on ``texts``,
    as a transformers ``PreTrainedTokenizerFast``. Deterministic for the same texts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    for token in (eos_token, pad_token):
        if token not in special_tokens:
            raise ValueError(f"'{token}' must be one of the special tokens {special_tokens}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(special_tokens):
        raise ValueError(
            f"vocab_size {vocab_size} is below the {len(alphabet)} byte symbols plus "
            f"{len(special_tokens)} special tokens"
        )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos_token, pad_token=pad_token)
