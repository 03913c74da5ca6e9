"""Abstract interfaces of the five component kinds, each declaring the shapes it works with.

The model checks these declarations when it assembles (:mod:`metamorph_core.model`) and names
both components and both numbers when they disagree. Shapes: ``b`` batch, ``n`` tokens per
image, ``l`` sequence length, ``d`` backbone width, ``c`` encoder token width.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from metamorph_core.decoding import DecodeConfig
from metamorph_core.pixels import Pixels

#: In the reload kwargs a component returns from ``save_pretrained``, this value stands for the
#: subfolder it was saved in. Without it, the loader passes ``pretrained=<subfolder>``.
SUBFOLDER = "<subfolder>"
#: In those kwargs, a string that starts with ``"<checkpoint>/"`` is a path relative to the
#: checkpoint directory (a LoRA backbone's local base model): moving the checkpoint together
#: with what it refers to keeps it loadable.
CHECKPOINT_DIR = "<checkpoint>"


class Component(nn.Module):
    """A registered building block.

    A component that is too large or too standard to live in ``model.safetensors`` (an LLM, a
    pretrained vision tower) overrides :meth:`save_pretrained` to write itself into a subfolder
    of the checkpoint and returns the keyword arguments that reload it from there.

    ``license`` (optional): the license of the weights the component was built from (an SPDX id
    or Hub license name), when the component knows it; the model card reports it.
    """

    license: str | None = None

    def save_pretrained(self, directory: Path) -> dict[str, Any] | None:
        """Write into ``directory`` and return reload kwargs, or ``None`` (weights go to
        the model's ``model.safetensors``)."""
        return None


class VisionEncoder(Component, ABC):
    """Images -> ``(b, num_tokens, hidden_size)`` visual tokens (L2-normalised by default).

    :meth:`preprocess` gives what :meth:`forward` takes, a :data:`~metamorph_core.pixels.Pixels`
    batch: one ``(b, 3, h, w)`` float32 tensor (most encoders), or, for an encoder whose
    input is not a fixed-size image, a dict of named tensors with the ``b`` images along dim 0
    and one shape per field (pad inside ``preprocess``). Preprocessing an image alone must give
    its row of a batch: data loaders preprocess image by image and the model stacks the rows
    (:func:`~metamorph_core.pixels.stack_pixels`). Frozen encoders keep ``requires_grad=False``
    and stay in eval mode; the model runs them under ``torch.no_grad()``.
    """

    hidden_size: int
    num_tokens: int
    #: ``(height, width)`` of :meth:`preprocess`'s pixel tensor; an encoder that gives a dict
    #: declares the size it reads images at best (conformance checks draw test images near it)
    image_size: tuple[int, int]
    frozen: bool = False

    def train(self, mode: bool = True) -> VisionEncoder:
        """A frozen encoder stays in eval mode (dropout off, norms fixed) whatever ``mode``."""
        return super().train(mode and not self.frozen)

    @abstractmethod
    def preprocess(self, images: Any) -> Pixels:
        """PIL images, arrays or tensors -> ``(b, 3, h, w)`` float pixel values (or the
        encoder's dict of fields) for :meth:`forward`."""

    @abstractmethod
    def forward(self, pixel_values: Pixels) -> torch.Tensor:
        """What :meth:`preprocess` gives (``b`` images) -> ``(b, num_tokens, hidden_size)``."""


class Projector(Component, ABC):
    """Visual tokens ``(..., in_dim)`` -> backbone inputs ``(..., out_dim)``."""

    in_dim: int
    out_dim: int


class VisionHead(Component, ABC):
    """Backbone hidden states ``(..., in_dim)`` -> predicted visual tokens ``(..., out_dim)``,
    L2-normalised when ``normalize`` is set."""

    in_dim: int
    out_dim: int
    normalize: bool


@dataclass
class BackboneOutput:
    """``hidden_states``: ``(b, l, d)`` after the final norm; ``cache``: the KV cache if used."""

    hidden_states: torch.Tensor
    cache: Any = None


class Backbone(Component, ABC):
    """A causal language model with the two image-wrapping special tokens.

    ``image_start_id`` / ``image_end_id`` are read from the tokenizer; ``max_length`` is the
    longest sequence the model supports.
    """

    hidden_size: int
    max_length: int
    image_start_id: int
    image_end_id: int
    tokenizer: Any

    @abstractmethod
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``(b, l)`` token ids -> ``(b, l, d)`` input embeddings."""

    @abstractmethod
    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Any = None,
        use_cache: bool = False,
    ) -> BackboneOutput:
        """Run the transformer on ``(b, l, d)`` embeddings; hidden states after the final norm."""

    @abstractmethod
    def logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``(b, l, d)`` final hidden states -> ``(b, l, vocab)`` text logits."""

    def blocks(self) -> list[nn.Module]:
        """The transformer blocks in order: the units FSDP2 shards one by one before the rest
        of the model. A backbone that returns none (the default) is sharded as one unit."""
        return []

    def static_cache(self, max_length: int) -> Any:
        """A KV cache for :meth:`forward` allocated once for ``max_length`` positions (the
        generation option ``cache_implementation="static"``)."""
        raise NotImplementedError(
            f"backbone {type(self).__name__} has no static KV cache; generate with "
            "cache_implementation='dynamic'"
        )


class VisualLoss(nn.Module, ABC):
    """Per-token visual loss: ``(t, c)`` predictions and targets -> ``(t,)`` losses.

    The model sums these and divides by the token count (docs/method.md, "Losses")."""

    @abstractmethod
    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor: ...


class VisualDecoder(Component, ABC):
    """Visual tokens ``(b, num_tokens, token_dim)`` -> images (a diffusion model, typically)."""

    token_dim: int
    num_tokens: int

    @abstractmethod
    def loss(self, tokens: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
        """Training loss of reconstructing ``pixel_values`` ``(b, 3, h, w)`` from ``tokens``."""

    @abstractmethod
    def decode(
        self, tokens: torch.Tensor, config: DecodeConfig | None = None, **options: Any
    ) -> torch.Tensor:
        """``(b, n, c)`` tokens -> ``(b, 3, h, w)`` images in ``[0, 1]``, sampled as ``config``
        says (``None``: the decoder's own default sampling; ``options``: fields as keywords,
        which override it); see :class:`~metamorph_core.decoding.DecodeConfig`."""

    def check_decoding(self, config: DecodeConfig) -> None:  # noqa: B027 (optional)
        """Raise ``ValueError`` naming the field when :meth:`decode` could not sample as
        ``config`` says (an unknown scheduler, one that does not fit the decoder's training):
        a server checks a request with it before generating. Decoders with choices beyond
        :class:`~metamorph_core.decoding.DecodeConfig`'s own checks implement it."""

    def set_progress_bar(self, enabled: bool = True) -> None:  # noqa: B027 (optional)
        """Show (or stop showing) a progress bar with ETA while :meth:`decode` runs, on a
        terminal; decoders that sample in many steps implement it, others ignore it."""
