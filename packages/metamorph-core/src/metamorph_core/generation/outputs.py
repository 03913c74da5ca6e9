"""What generation gives back: one :class:`GenerationResult` per prompt, and the events
:func:`metamorph_core.generation.stream` yields as they happen."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class GenerationResult:
    """One sample's output.

    ``text``: the generated text, with :data:`IMAGE_PLACEHOLDER` where each generated image
    stands and without the stop string or EOS (so ``Turn("assistant", text)`` with the images
    as :class:`ImageFeatures` continues the conversation). ``token_ids``: the generated text
    ids, ``<image_start>``/``<image_end>`` and a final EOS included. ``images``: per generated
    image its ``(n, c)`` float32 L2-normalised visual tokens. ``pil_images``: their decoded
    pictures when ``decode_images`` was set. ``finish_reason``: ``"stop"`` (EOS, end of turn or
    stop string), ``"length"`` (``max_new_tokens`` or the context is full), ``"image"``
    (:func:`generate_image` stops after its image) or ``"cancelled"`` (``should_stop`` of
    :func:`~metamorph_core.generation.stream_encoded` said so).
    """

    text: str
    token_ids: list[int]
    images: list[torch.Tensor]
    pil_images: list[Any]
    finish_reason: str


@dataclass
class TextEvent:
    """A piece of sample ``sample``'s text that is final."""

    sample: int
    text: str


@dataclass
class ImageEvent:
    """Sample ``sample``'s image number ``index`` is complete: ``(n, c)`` ``tokens`` and, when
    decoding, its PIL ``image``."""

    sample: int
    index: int
    tokens: torch.Tensor
    image: Any = None


@dataclass
class DoneEvent:
    """Sample ``sample`` has finished."""

    sample: int
    result: GenerationResult


GenerationEvent = TextEvent | ImageEvent | DoneEvent
