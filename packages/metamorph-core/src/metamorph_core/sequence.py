"""The interleaved sequence builder: a conversation -> ids, labels and image slots.

Every image, in prompts too, becomes ``<image_start>`` + ``num_image_tokens`` slots +
``<image_end>``. Labels follow the transformers convention (``labels[t]`` is the id at ``t``
when trained, else ``IGNORE_INDEX``; the model shifts by one). In an assistant turn
``<image_start>`` and ``<image_end>`` are trained text and the slots are visual targets; in
any other turn the whole image is context.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from metamorph_core.conversation import IMAGE_PLACEHOLDER, ChatTemplate, Conversation
from metamorph_core.errors import ConversationError
from metamorph_core.tokenizer_template import AutoTemplate, TokenizerChatTemplate, tokenizer_name

IGNORE_INDEX = -100
logger = logging.getLogger("metamorph")


@dataclass
class EncodedSample:
    """One conversation as token ids. ``image_slots[i]`` is the index of image ``i``'s first
    slot; ``image_targets[i]`` says whether image ``i`` is a generation target."""

    input_ids: list[int]
    labels: list[int]
    image_slots: list[int]
    image_targets: list[bool]
    images: list[Any] = field(default_factory=list)
    num_image_tokens: int = 0
    id: str | None = None
    truncated_tokens: int = 0
    dropped_images: int = 0

    def __len__(self) -> int:
        return len(self.input_ids)


class SequenceBuilder:
    """Renders conversations with a template and the backbone's tokenizer.

    ``template``: a named :class:`ChatTemplate`, rendered piece by piece, or ``auto``, which
    renders with the tokenizer's own chat template (:mod:`metamorph_core.tokenizer_template`);
    ``self.template`` is then what ``auto`` chose for this tokenizer.

    ``max_length``: longest sequence allowed. Longer ones raise, unless ``truncation`` is set:
    then the sequence is cut at ``max_length`` or, if that falls inside an image, just before
    that image's ``<image_start>``; cut images are dropped and counted on the sample.
    """

    def __init__(
        self,
        tokenizer: Any,
        template: ChatTemplate | AutoTemplate,
        num_image_tokens: int,
        image_start_id: int,
        image_end_id: int,
        max_length: int | None = None,
        truncation: bool = False,
        pad_id: int = 0,
    ) -> None:
        self.tokenizer = tokenizer
        self.template: ChatTemplate | TokenizerChatTemplate = (
            template.for_tokenizer(tokenizer) if isinstance(template, AutoTemplate) else template
        )
        self.num_image_tokens = num_image_tokens
        self.image_start_id, self.image_end_id = image_start_id, image_end_id
        self.max_length, self.truncation, self.pad_id = max_length, truncation, pad_id
        self._check_template(template.name)
        # Template pieces repeat in every sample; a bounded cache keeps memory flat over corpora.
        self._tokenize = functools.lru_cache(maxsize=4096)(self._tokenize_uncached)

    def _check_template(self, requested: str) -> None:
        vocab = self.tokenizer.get_vocab()
        name = tokenizer_name(self.tokenizer)
        missing = [t for t in self.template.required_tokens if t not in vocab]
        if missing:
            chosen = f"template '{self.template.name}'"
            if requested != self.template.name:
                chosen += f" (what '{requested}' uses when the tokenizer has no chat template)"
            raise ConversationError(
                f"{chosen} needs the tokens {missing}, which tokenizer '{name}' lacks; pick a "
                "template that matches the backbone (auto when its tokenizer has a chat "
                "template, llama3 for Llama 3, chatml for Qwen, gemma, mistral, phi3, plain for "
                "anything)"
            )
        for literal in ("<image_start>", "<image_end>"):
            if literal not in vocab:
                raise ConversationError(
                    f"tokenizer '{name}' has no {literal} token; build the backbone through "
                    "metamorph (it adds them) before building sequences"
                )

    def _tokens(self, text: str) -> tuple[int, ...]:
        if text == "<bos>":
            bos = self.tokenizer.bos_token_id
            return () if bos is None else (int(bos),)
        return self._tokenize(text)

    def text_ids(self, text: str) -> list[int]:
        """Token ids of a piece of plain text, tokenised as the builder tokenises a piece."""
        return list(self._tokens(text))

    def _tokenize_uncached(self, text: str) -> tuple[int, ...]:
        self._refuse_wrap_tokens(text)
        return tuple(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    @staticmethod
    def _refuse_wrap_tokens(text: str) -> None:
        if "<image_start>" in text or "<image_end>" in text:
            raise ConversationError(
                f"text contains a literal <image_start>/<image_end>: {text[:80]!r}. Write "
                f"'{IMAGE_PLACEHOLDER}' where an image stands; the builder wraps every image."
            )

    def encode(
        self, conversation: Conversation, add_generation_prompt: bool = False
    ) -> EncodedSample:
        n_placeholders = conversation.num_placeholders
        if n_placeholders != len(conversation.images):
            raise ConversationError(
                f"sample {conversation.id!r}: its text has {n_placeholders} '{IMAGE_PLACEHOLDER}' "
                f"placeholder(s) but {len(conversation.images)} image(s) were given; they must "
                "match one to one"
            )
        ids: list[int] = []
        labels: list[int] = []
        slots: list[int] = []
        targets: list[bool] = []
        for toks, trained in self._runs(conversation, add_generation_prompt):
            if toks is None:  # an image
                ids.append(self.image_start_id)
                labels.append(self.image_start_id if trained else IGNORE_INDEX)
                slots.append(len(ids))
                targets.append(trained)
                ids += [self.pad_id] * self.num_image_tokens
                labels += [IGNORE_INDEX] * self.num_image_tokens
                ids.append(self.image_end_id)
                labels.append(self.image_end_id if trained else IGNORE_INDEX)
            else:
                ids += toks
                labels += toks if trained else (IGNORE_INDEX,) * len(toks)
        sample = EncodedSample(
            ids,
            labels,
            slots,
            targets,
            list(conversation.images),
            self.num_image_tokens,
            conversation.id,
        )
        if self.max_length is not None and len(ids) > self.max_length:
            if not self.truncation or add_generation_prompt:
                raise ConversationError(
                    f"sample {conversation.id!r} is {len(ids)} tokens long, over the maximum "
                    f"of {self.max_length}; shorten it or raise max_length"
                    + (
                        ""
                        if add_generation_prompt
                        else ", or set truncation=True (which never cuts inside an image)"
                    )
                )
            sample = self._truncate(sample)
            if all(lab == IGNORE_INDEX for lab in sample.labels):
                raise ConversationError(
                    f"sample {conversation.id!r}: truncating it to {self.max_length} tokens "
                    "leaves no trained token; raise max_length or drop the sample"
                )
            logger.warning(
                "sample %r truncated to %d tokens: %d tokens and %d image(s) cut",
                conversation.id,
                len(sample),
                sample.truncated_tokens,
                sample.dropped_images,
            )
        return sample

    def _runs(
        self, conversation: Conversation, add_generation_prompt: bool
    ) -> Iterator[tuple[Sequence[int] | None, bool]]:
        """``(ids, trained)`` runs of the rendered conversation; ``None`` for an image."""
        if isinstance(self.template, TokenizerChatTemplate):
            for turn in conversation.turns:
                self._refuse_wrap_tokens(turn.content)
            yield from self.template.encode(conversation, add_generation_prompt)
            return
        for text, trained in self.template.pieces(conversation, add_generation_prompt):
            for j, chunk in enumerate(text.split(IMAGE_PLACEHOLDER)):
                if j > 0:  # an image stands before this chunk
                    yield None, trained
                if chunk:
                    yield self._tokens(chunk), trained

    def _truncate(self, s: EncodedSample) -> EncodedSample:
        assert self.max_length is not None
        cut = self.max_length
        for start in s.image_slots:  # the image block spans [start - 1, start + n]
            if start - 1 < cut <= start + self.num_image_tokens:
                cut = start - 1
        keep = [i for i, start in enumerate(s.image_slots) if start + self.num_image_tokens < cut]
        return EncodedSample(
            s.input_ids[:cut],
            s.labels[:cut],
            [s.image_slots[i] for i in keep],
            [s.image_targets[i] for i in keep],
            [s.images[i] for i in keep],
            s.num_image_tokens,
            s.id,
            len(s.input_ids) - cut,
            len(s.image_slots) - len(keep),
        )


def collate(samples: list[EncodedSample], pad_id: int = 0) -> dict[str, Any]:
    """Right-pad samples into a batch.

    Returns ``input_ids``, ``attention_mask``, ``labels`` ``(b, l)``; ``image_slot_mask`` and
    ``target_slot_mask`` ``(b, l)`` bool; ``images``: every sample's images in order (sample,
    then appearance), matching the row-major order of ``image_slot_mask``'s image blocks; and
    ``image_is_target`` ``(n,)`` bool.
    """
    if not samples:
        raise ValueError("collate needs at least one sample")
    length = max(len(s) for s in samples)
    b = len(samples)
    input_ids = torch.full((b, length), pad_id, dtype=torch.long)
    labels = torch.full((b, length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((b, length), dtype=torch.long)
    slot_mask = torch.zeros((b, length), dtype=torch.bool)
    target_mask = torch.zeros((b, length), dtype=torch.bool)
    images: list[Any] = []
    is_target: list[bool] = []
    for i, s in enumerate(samples):
        n = len(s)
        input_ids[i, :n] = torch.tensor(s.input_ids, dtype=torch.long)
        labels[i, :n] = torch.tensor(s.labels, dtype=torch.long)
        attention_mask[i, :n] = 1
        for start, target in zip(s.image_slots, s.image_targets, strict=True):
            slot_mask[i, start : start + s.num_image_tokens] = True
            target_mask[i, start : start + s.num_image_tokens] = target
        images += s.images
        is_target += s.image_targets
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "image_slot_mask": slot_mask,
        "target_slot_mask": target_mask,
        "images": images,
        "image_is_target": torch.tensor(is_target, dtype=torch.bool),
    }


def pack(samples: list[EncodedSample], max_length: int, pad_id: int = 0) -> dict[str, Any]:
    """Pack samples into rows of at most ``max_length`` tokens (first fit, in order).

    Attention stays inside each sample: every sample's ``position_ids`` restart at 0 and no
    ``attention_mask`` is returned, which transformers turns into a block-diagonal causal mask
    (only without a KV cache, so this is for training). Each sample's first token carries no
    label, as in an unpacked row. Returns the :func:`collate` keys (less ``attention_mask``)
    plus ``position_ids`` and ``sample_index`` ``(b, l)``: which sample each position holds
    (``-1`` for padding).
    """
    if not samples:
        raise ValueError("pack needs at least one sample")
    rows: list[list[int]] = []
    used: list[int] = []
    for i, s in enumerate(samples):
        if len(s) > max_length:
            raise ValueError(
                f"sample {s.id!r} has {len(s)} tokens, more than the packing length {max_length}; "
                "raise the packing length or truncate the sample"
            )
        for r in range(len(rows)):
            if used[r] + len(s) <= max_length:
                rows[r].append(i)
                used[r] += len(s)
                break
        else:
            rows.append([i])
            used.append(len(s))
    b, length = len(rows), max(used)
    input_ids = torch.full((b, length), pad_id, dtype=torch.long)
    labels = torch.full((b, length), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((b, length), dtype=torch.long)
    sample_index = torch.full((b, length), -1, dtype=torch.long)
    slot_mask = torch.zeros((b, length), dtype=torch.bool)
    target_mask = torch.zeros((b, length), dtype=torch.bool)
    images: list[Any] = []
    is_target: list[bool] = []
    for r, members in enumerate(rows):
        at = 0
        for i in members:
            s, n = samples[i], len(samples[i])
            input_ids[r, at : at + n] = torch.tensor(s.input_ids, dtype=torch.long)
            labels[r, at : at + n] = torch.tensor(s.labels, dtype=torch.long)
            labels[r, at] = IGNORE_INDEX  # never predicted from the previous sample
            position_ids[r, at : at + n] = torch.arange(n)
            sample_index[r, at : at + n] = i
            for start, target in zip(s.image_slots, s.image_targets, strict=True):
                slot_mask[r, at + start : at + start + s.num_image_tokens] = True
                target_mask[r, at + start : at + start + s.num_image_tokens] = target
            images += s.images
            is_target += s.image_targets
            at += n
        position_ids[r, at:] = torch.arange(length - at)  # padding: a sequence of its own
    return {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": position_ids,
        "image_slot_mask": slot_mask,
        "target_slot_mask": target_mask,
        "images": images,
        "image_is_target": torch.tensor(is_target, dtype=torch.bool),
        "sample_index": sample_index,
    }
