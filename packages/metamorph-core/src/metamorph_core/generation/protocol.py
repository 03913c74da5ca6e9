"""What generation needs of a unified model: :class:`GenerativeModel`. It is a protocol, not a
base class: :class:`~metamorph_core.model.MetaMorphModel` implements it, and so can any model
that wants our generation loop (sampling, KV cache, guidance, streaming) without being one."""

from __future__ import annotations

from typing import Any, Protocol

import torch

from metamorph_core.decoding import DecodeConfig
from metamorph_core.interfaces import Backbone, VisionEncoder, VisualDecoder
from metamorph_core.pixels import Pixels
from metamorph_core.sequence import SequenceBuilder


class GenerativeModel(Protocol):
    """The parts and methods the generation loop uses. Shapes: ``b`` rows, ``l`` length,
    ``d`` backbone width, ``n`` visual tokens per image, ``c`` their width."""

    #: renders conversations with the chat template (ids, image slots, special token ids)
    sequence_builder: SequenceBuilder
    #: the LLM: ``embed``, ``forward`` with a KV cache, ``logits``, ``tokenizer``
    backbone: Backbone
    #: reads prompt images (``preprocess``)
    encoder: VisionEncoder

    @property
    def num_image_tokens(self) -> int:
        """Visual tokens per image (``n``)."""
        ...

    @property
    def image_answer_prefix(self) -> str:
        """What an answer says before a generated image when the caller does not say."""
        ...

    def encode_images(self, pixel_values: Pixels) -> torch.Tensor:
        """``k`` images through the encoder's ``preprocess`` (``(k, 3, h, w)``, or its dict of
        fields) -> ``(k, n, c)`` visual tokens."""
        ...

    def embed_inputs(
        self,
        input_ids: torch.Tensor,
        image_slot_mask: torch.Tensor | None = None,
        image_tokens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``(b, l)`` ids -> ``(b, l, d)`` embeddings with the ``(k, n, c)`` image tokens written
        into the ``(b, l)`` slots."""
        ...

    def project_visual(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(..., c)`` visual tokens -> ``(..., d)`` backbone inputs."""
        ...

    def predict_visual_tokens(self, hidden: torch.Tensor) -> torch.Tensor:
        """``(..., d)`` final hidden states -> ``(..., c)`` float32 L2-normalised tokens."""
        ...

    def require_decoder(self) -> VisualDecoder:
        """The attached visual decoder, or a clear error."""
        ...

    def decode_images(
        self, tokens: torch.Tensor, config: DecodeConfig | None = None, **options: Any
    ) -> Any:
        """``(b, n, c)`` tokens -> ``(b, 3, h, w)`` pixels in ``[0, 1]`` through the decoder."""
        ...
