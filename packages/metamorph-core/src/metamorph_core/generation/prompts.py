"""Prompts for generation: strings and conversations -> token ids rendered with the model's
template and assistant header (plus the unconditional, prompt-dropped version under guidance)
-> left-padded input embeddings with the prompt images written in through the projector."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from metamorph_core.conversation import IMAGE_PLACEHOLDER, Conversation, ImageFeatures, Turn
from metamorph_core.errors import ConversationError
from metamorph_core.generation.config import GenerationConfig
from metamorph_core.generation.protocol import GenerativeModel
from metamorph_core.pixels import move_pixels
from metamorph_core.sequence import EncodedSample

Prompt = str | Conversation


def to_conversations(
    prompts: Prompt | Sequence[Prompt], images: Sequence[Any] | None = None
) -> list[Conversation]:
    """Strings become one user turn each; ``images`` belong to a single string prompt, each
    where an ``<image>`` stands or, when the text has none, all of them before it with one
    newline after the last (as the research code's demo lays them out)."""
    single = isinstance(prompts, (str, Conversation))
    items = [prompts] if single else list(prompts)
    if not items:
        raise ValueError("generation needs at least one prompt")
    if images and not (single and isinstance(prompts, str)):
        raise ValueError(
            "images= goes with a single string prompt; give each of several prompts its "
            "images in a Conversation(turns, images)"
        )
    out = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            text = item
            missing = len(images or ()) - text.count(IMAGE_PLACEHOLDER)
            if missing > 0 and IMAGE_PLACEHOLDER not in text:
                # the research code's layout: the images one after another, then one newline
                text = IMAGE_PLACEHOLDER * missing + "\n" + text
            item = Conversation([Turn("user", text)], list(images or ()), id=f"prompt-{i}")
        elif not isinstance(item, Conversation):
            raise TypeError(
                f"prompt {i} is a {type(item).__name__}; pass a string or a Conversation"
            )
        if not item.turns or item.turns[-1].role != "user":
            raise ConversationError(
                f"prompt {i} ({item.id!r}) must end with a user turn, the one the model "
                "answers; to continue an answer, pass its start as response_prefix="
            )
        out.append(item)
    return out


@dataclass
class EncodedPrompt:
    """A prompt as the generation loop reads it: the conditional sample and, under guidance,
    its unconditional (prompt-dropped) counterpart."""

    sample: EncodedSample
    unconditional: EncodedSample | None = None


def encode_prompts(
    model: GenerativeModel,
    conversations: Sequence[Conversation],
    response_prefix: str | Sequence[str] = "",
    config: GenerationConfig | None = None,
    force_image: bool = False,
) -> list[EncodedPrompt]:
    """Render conversations with the model's template and the assistant header, then
    ``response_prefix`` (one string for all, or one per conversation) and ``<image_start>``
    when ``force_image``. Under guidance (``config.visual_guidance_scale != 1``) each prompt also gets
    its unconditional version: :meth:`Conversation.drop_prompt`, rendered the same way."""
    builder = model.sequence_builder
    prefixes = per_prompt_prefixes(response_prefix, len(conversations))
    guided = config is not None and config.visual_guidance_scale != 1.0

    def encode(conv: Conversation, prefix: str) -> EncodedSample:
        tail = builder.text_ids(prefix) if prefix else []
        if force_image:
            tail.append(builder.image_start_id)
        s = builder.encode(conv, add_generation_prompt=True)
        return dataclasses.replace(s, input_ids=s.input_ids + tail, labels=[])

    return [
        EncodedPrompt(encode(c, p), encode(c.drop_prompt(), p) if guided else None)
        for c, p in zip(conversations, prefixes, strict=True)
    ]


def per_prompt_prefixes(response_prefix: str | Sequence[str], n: int) -> list[str]:
    """``response_prefix`` as one string per prompt; a sequence must hold exactly ``n``."""
    if isinstance(response_prefix, str):
        return [response_prefix] * n
    prefixes = list(response_prefix)
    if len(prefixes) != n or not all(isinstance(p, str) for p in prefixes):
        raise ValueError(
            f"response_prefix holds {len(prefixes)} items for {n} prompts; pass one string for "
            "all prompts or one string per prompt"
        )
    return prefixes


def _image_tokens(model: GenerativeModel, samples: Sequence[EncodedSample]) -> torch.Tensor | None:
    """Every prompt image's ``(n, c)`` tokens in slot order: features as given, the rest
    encoded in one batch. ``None`` when there are no images."""
    images = [img for s in samples for img in s.images]
    if not images:
        return None
    device = next(model.backbone.parameters()).device
    raw = [i for i, img in enumerate(images) if not isinstance(img, ImageFeatures)]
    tokens: list[torch.Tensor | None] = [
        img.tokens.to(device) if isinstance(img, ImageFeatures) else None for img in images
    ]
    if raw:
        pixels = move_pixels(model.encoder.preprocess([images[i] for i in raw]), device)
        for i, t in zip(raw, model.encode_images(pixels), strict=True):
            tokens[i] = t
    return torch.stack([t.float() for t in tokens if t is not None])


def embed_prompts(
    model: GenerativeModel, samples: Sequence[EncodedSample]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``(r, l, d)`` input embeddings (image slots filled through the projector)
    and the ``(r, l)`` attention mask."""
    device = next(model.backbone.parameters()).device
    length = max(len(s.input_ids) for s in samples)
    ids = torch.full((len(samples), length), model.sequence_builder.pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    slots = torch.zeros_like(ids, dtype=torch.bool)
    for i, s in enumerate(samples):
        pad = length - len(s.input_ids)
        ids[i, pad:] = torch.tensor(s.input_ids, dtype=torch.long)
        mask[i, pad:] = 1
        for start in s.image_slots:
            slots[i, pad + start : pad + start + s.num_image_tokens] = True
    ids, mask, slots = ids.to(device), mask.to(device), slots.to(device)
    return model.embed_inputs(ids, slots, _image_tokens(model, samples)), mask
