"""Tokenizers trained on a project's own text with the ``tokenizers`` library, for language
models and encoders pretrained from scratch (no hub download)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
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


def source_tokenizer(
    given: str | None,
    kept: Path,
    sources: Iterable[Any],
    vocab_size: int,
    check: Callable[..., Any],
    text_of: Callable[[dict[str, Any]], str],
) -> Any:
    """``given`` (a tokenizer directory), or one trained on the text of ``sources`` (recipe
    sources: ``path``, ``streaming``) and kept in ``kept`` so that a resumed run uses the very
    same one (a kept one is reused)."""
    import torch
    from transformers import AutoTokenizer

    from metamorph_core.checkpoint import atomic_directory
    from metamorph_train.data.records import iter_records
    from metamorph_train.data.stream import shard_paths

    if given:
        return AutoTokenizer.from_pretrained(given)
    if (kept / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(str(kept))
    sources = list(sources)

    def texts() -> Iterator[str]:
        for s in sources:
            for path in shard_paths(s.path) if s.streaming else [Path(s.path)]:
                for record in iter_records(path, "skip", {}, check):
                    yield text_of(record)

    tokenizer = train_tokenizer(texts(), vocab_size)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    if rank == 0:  # every rank trains the same tokenizer from the same text; one writes it
        with atomic_directory(kept, "tokenizer") as tmp:
            tokenizer.save_pretrained(str(tmp))
    return tokenizer
