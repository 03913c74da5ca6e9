"""Interleaved generation: text and images from one model (docs/method.md, "Inference").

Text is decoded token by token (greedy or sampled). When a sample emits ``<image_start>`` it
regresses exactly ``num_image_tokens`` visual tokens, with the training alignment: the state
at ``<image_start>`` predicts visual token 1 and the state at visual token ``t`` predicts
``t + 1``. Each vision-head output is L2-normalised and fed back through the input projector
as the next input embedding; after the last one ``<image_end>`` is appended (forced) and text
resumes, until EOS, a stop string or ``max_new_tokens``.

- A KV cache serves text and visual steps alike. ``use_cache=False`` recomputes the whole
  sequence at every step instead: the research code's loop, kept as the reference.
- Prompts of different lengths share a batch through left padding, an attention mask and
  position ids ``cumsum(mask) - 1``; each sample enters and leaves image mode on its own.
- Classifier-free guidance on visual tokens (``visual_guidance_scale != 1``) adds, per sample, the
  prompt-dropped conversation (:meth:`Conversation.drop_prompt`, the input prompt dropout
  trains) as a row of the same batched forward. That row follows its sample's tokens; a visual
  token is ``normalize(uncond + s * (cond - uncond))`` of the two normalised head outputs.
- :func:`stream` yields text pieces and images as they complete; :func:`generate` collects
  them; :func:`generate_image` forces an image (the answer is prefilled with
  ``<image_start>``).

- Each completed image can be decoded to pixels by the model's visual decoder
  (``decode_images``), sampled as ``decoding`` (:class:`~metamorph_core.decoding.DecodeConfig`)
  says; the decoder's own ``guidance_scale`` is a different knob from the LLM's
  ``visual_guidance_scale``.

Generation needs only :class:`GenerativeModel` of a model (:mod:`.protocol`). Modules:
:mod:`.config` (:class:`GenerationConfig`), :mod:`.outputs` (results and events),
:mod:`.prompts` (prompts -> ids -> embeddings), :mod:`.loop` (the loop), :mod:`.rows` (the
batch's sequences on the backbone: cache, rows joining and leaving), :mod:`.static_cache`
(static caches pooled between batches, the compiled step), :mod:`.sampling`,
:mod:`.detokenize` (incremental text with stop strings).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

from metamorph_core.generation.config import GenerationConfig, check_options
from metamorph_core.generation.loop import (
    Admission,
    check_room,
    stream_encoded,
    to_pil,
)
from metamorph_core.generation.outputs import (
    DoneEvent,
    GenerationEvent,
    GenerationResult,
    ImageEvent,
    TextEvent,
)
from metamorph_core.generation.prompts import (
    EncodedPrompt,
    Prompt,
    encode_prompts,
    to_conversations,
)
from metamorph_core.generation.protocol import GenerativeModel
from metamorph_core.generation.static_cache import check_cache

__all__ = [
    "Admission",
    "DoneEvent",
    "EncodedPrompt",
    "GenerationConfig",
    "GenerationEvent",
    "GenerationResult",
    "GenerativeModel",
    "ImageEvent",
    "Prompt",
    "TextEvent",
    "check_cache",
    "check_room",
    "encode_prompts",
    "generate",
    "generate_image",
    "stream",
    "stream_encoded",
    "to_conversations",
    "to_pil",
]


def stream(
    model: GenerativeModel,
    prompts: Prompt | Sequence[Prompt],
    images: Sequence[Any] | None = None,
    *,
    response_prefix: str | Sequence[str] | None = None,
    force_image: bool = False,
    config: GenerationConfig | None = None,
    **options: Any,
) -> Iterator[GenerationEvent]:
    """Generate for ``prompts`` and yield :class:`TextEvent`, :class:`ImageEvent` and, once
    per sample, :class:`DoneEvent` as they happen.

    A prompt is a string (one user turn) or a :class:`Conversation` ending in a user turn; the
    model's chat template adds the assistant header. ``images`` go with a single string prompt
    (each where an ``<image>`` stands, else before the text); give a list of prompts their
    images through conversations. ``response_prefix``: text the answer starts with (not part
    of the result), one string for every prompt or one per prompt; ``None``: nothing, or with
    ``force_image`` the model's ``image_answer_prefix`` (the words its training data answers
    generation requests with). ``force_image``: the answer (after ``response_prefix``) is one
    image, see :func:`generate_image`. ``options``
    set or override :class:`GenerationConfig` fields.
    """
    check_options(options)
    if response_prefix is None:
        response_prefix = model.image_answer_prefix if force_image else ""
    conversations = to_conversations(prompts, images)
    cfg = dataclasses.replace(config or GenerationConfig(), **options)
    encoded = encode_prompts(model, conversations, response_prefix, cfg, force_image)
    return stream_encoded(model, encoded, cfg, force_image)


def generate(
    model: GenerativeModel,
    prompts: Prompt | Sequence[Prompt],
    images: Sequence[Any] | None = None,
    *,
    response_prefix: str | Sequence[str] = "",
    config: GenerationConfig | None = None,
    **options: Any,
) -> list[GenerationResult]:
    """Generate for ``prompts`` (see :func:`stream`); one result per prompt, in order."""
    events = stream(
        model, prompts, images, response_prefix=response_prefix, config=config, **options
    )
    return _collect(events)


def generate_image(
    model: GenerativeModel,
    prompts: Prompt | Sequence[Prompt],
    images: Sequence[Any] | None = None,
    *,
    response_prefix: str | Sequence[str] | None = None,
    config: GenerationConfig | None = None,
    **options: Any,
) -> list[GenerationResult]:
    """Text-to-image (and, with input images, image-to-image): each answer is prefilled with
    ``response_prefix`` (default: the model's ``image_answer_prefix``, "Here is an image based
    on your request: " as in the paper's data) and ``<image_start>``, so exactly one image is
    generated; each result
    holds that image, its text is ``"<image>"`` and it finishes with ``"image"``."""
    events = stream(
        model,
        prompts,
        images,
        response_prefix=response_prefix,
        force_image=True,
        config=config,
        **options,
    )
    return _collect(events)


def _collect(events: Iterator[GenerationEvent]) -> list[GenerationResult]:
    done = {e.sample: e.result for e in events if isinstance(e, DoneEvent)}
    return [done[i] for i in range(len(done))]
