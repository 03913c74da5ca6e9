"""``decoder``: a visual decoder learns to draw images from the tokens of a frozen encoder
(encoded live, or read from ``data.feature_cache``). The cache may be a *predicted* one
(``metamorph cache-features --predicted-by``): a decoder given as ``pretrained`` is then
fine-tuned to draw each image from the tokens a unified model generated for its prompt. Saves
the decoder in the SD layout (``create("decoder", "sd-unet", pretrained=...)`` loads it)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from metamorph_core.pixels import Pixels, move_pixels, split_pixels, stack_pixels
from metamorph_train.data import ImageDataset, ImageItem
from metamorph_train.objectives.base import Objective

if TYPE_CHECKING:  # pragma: no cover
    from metamorph_train.cache import FeatureCache
    from metamorph_train.recipe import Recipe


@dataclass
class DecoderModel:
    """The ``model:`` section of a ``decoder`` recipe: the decoder to train (registry name +
    kwargs; ``token_dim``/``num_tokens`` default to the encoder's) and the frozen encoder whose
    tokens it learns from (it also checks a feature cache)."""

    decoder: dict[str, Any]
    encoder: dict[str, Any]


@dataclass
class DecoderOptions:
    """The recipe's ``objective:`` section for ``decoder``. ``resize``: how an image of
    another size than the decoder's becomes its target: ``crop`` (the paper's visualizer:
    the shorter side resized to the decoder's size, bilinear with antialiasing, then the centre
    cropped) or ``squash`` (both sides resized, aspect ratio not kept)."""

    resize: str = "crop"

    def __post_init__(self) -> None:
        if self.resize not in RESIZE_MODES:
            raise ValueError(
                f"recipe key 'objective.resize' = '{self.resize}'; use one of {RESIZE_MODES}"
            )


RESIZE_MODES = ("crop", "squash")


class DecoderLoss(nn.Module):
    """The decoder's diffusion loss as a module (so DDP/FSDP see a forward). The frozen
    encoder, when given, makes the tokens of images that come without cached ones."""

    def __init__(self, decoder: nn.Module, encoder: nn.Module | None = None) -> None:
        super().__init__()
        self.decoder = decoder
        self.encoder = encoder.requires_grad_(False).eval() if encoder is not None else None

    def forward(
        self,
        pixels: torch.Tensor,
        seed: int,
        tokens: torch.Tensor | None = None,
        encoder_pixels: Pixels | None = None,
    ) -> torch.Tensor:
        if tokens is None:
            assert self.encoder is not None and encoder_pixels is not None
            with torch.no_grad():
                tokens = self.encoder(encoder_pixels)
        generator = torch.Generator(pixels.device).manual_seed(seed)
        # decoder.loss is a mean over every element; times the batch it is a sum over images
        return self.decoder.loss(tokens, pixels, generator) * pixels.shape[0]

    def train(self, mode: bool = True) -> DecoderLoss:
        super().train(mode)
        if self.encoder is not None:
            self.encoder.eval()
        return self


class DecoderObjective(Objective):
    """Diffusion-decoder training on encoder tokens (cached, or encoded live by ``encoder``).
    Noise, timesteps and conditioning dropout are drawn from a generator seeded per step,
    micro-batch and rank, so a resumed run draws exactly what an uninterrupted one does.
    ``reference_encoder``: the encoder a feature cache must come from (default ``encoder``)."""

    name = "decoder"
    Options = DecoderOptions
    Model = DecoderModel
    dataset = ImageDataset
    terms = ("diffusion",)
    units = ("images",)
    throughput_unit = "images"

    def __init__(
        self,
        decoder: nn.Module,
        encoder: nn.Module | None = None,
        reference_encoder: nn.Module | None = None,
        resize: str = "crop",
    ) -> None:
        super().__init__(DecoderLoss(decoder, encoder))
        if resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, got '{resize}'")
        self.resize = resize
        self.reference_encoder = reference_encoder if reference_encoder is not None else encoder
        if encoder is not None and (
            encoder.num_tokens != decoder.num_tokens or encoder.hidden_size != decoder.token_dim
        ):
            raise ValueError(
                f"encoder gives {encoder.num_tokens} tokens of width {encoder.hidden_size}, "
                f"decoder expects {decoder.num_tokens} of width {decoder.token_dim}"
            )

    @classmethod
    def from_recipe(cls, recipe: Recipe) -> DecoderObjective:
        from metamorph_core import create
        from metamorph_core.config import ComponentSpec

        m: DecoderModel = recipe.model
        enc = ComponentSpec.parse(m.encoder, "model.encoder")
        encoder = create("encoder", enc.name, **enc.kwargs)
        dec = ComponentSpec.parse(m.decoder, "model.decoder")
        kwargs = dict(dec.kwargs)
        kwargs.setdefault("token_dim", encoder.hidden_size)  # a saved decoder must agree
        kwargs.setdefault("num_tokens", encoder.num_tokens)
        decoder = create("decoder", dec.name, **kwargs)
        # with a feature cache the encoder only checks that the cache is its own
        live = None if recipe.data.feature_cache else encoder
        return cls(decoder, live, reference_encoder=encoder, resize=recipe.options.resize)

    def feature_cache(self, path: str) -> FeatureCache:
        from metamorph_train.cache import FeatureCache

        # the decoder may learn from tokens an LLM predicted (metamorph cache-features
        # --predicted-by); everything else needs the encoder's own tokens of the images
        return FeatureCache(path, self.reference_encoder, allow_predicted=True)

    def item_transform(self) -> Callable[[Any], Any] | None:
        encoder = self.module.encoder
        return FitImages(
            tuple(self.module.decoder.image_size),
            self.resize,
            None if encoder is None else encoder.preprocess,
        )

    def batch(self, items: list[Any], seed: int) -> dict[str, Any]:
        decoder, encoder = self.module.decoder, self.module.encoder
        pixels = [p for item in items for p in item.pixels]
        device = self.device()
        out: dict[str, Any] = {"seed": seed}
        size = decoder.image_size
        out["pixels"] = torch.stack([fit(p, size, self.resize) for p in pixels]).to(device)
        if all(item.tokens is not None for item in items):
            out["tokens"] = torch.stack([t for item in items for t in item.tokens]).to(device)
        elif encoder is None:
            raise ValueError(
                "decoder training needs encoder tokens: give model.encoder (tokens are "
                "computed live) or data.feature_cache"
            )
        elif all(item.encoder_pixels is not None for item in items):  # made by loader workers
            made = stack_pixels([p for item in items for p in item.encoder_pixels])
            out["encoder_pixels"] = move_pixels(made, device)
        else:
            out["encoder_pixels"] = move_pixels(encoder.preprocess(pixels), device)
        return out

    def counts(self, batch: dict[str, Any]) -> list[float]:
        return [float(batch["pixels"].shape[0])]

    def loss_sums(self, call: Any, batch: dict[str, Any]) -> list[torch.Tensor]:
        return [call(**batch)]

    def throughput(self, batch: dict[str, Any]) -> int:
        return int(batch["pixels"].shape[0])

    def enable_gradient_checkpointing(self, every: int = 1, offload: bool = False) -> None:
        if every != 1 or offload:
            raise ValueError(
                "the decoder objective checkpoints every block of the UNet (diffusers' own "
                "switch); leave train.checkpoint_every at 1 and train.checkpoint_offload off"
            )
        self.module.decoder.unet.enable_gradient_checkpointing()

    def save(self, path: Path) -> Path:
        self.module.decoder.save_pretrained(path)
        return path


@dataclass(frozen=True)
class FitImages:
    """An item's read images fitted to the decoder's size and, when tokens are encoded live,
    put through the encoder's ``preprocess`` (run in the loader's workers)."""

    size: tuple[int, int]
    resize: str
    preprocess: Callable[[Any], Pixels] | None

    def __call__(self, item: ImageItem) -> ImageItem:
        encoder_pixels = None
        if item.tokens is None and self.preprocess is not None:
            encoder_pixels = [split_pixels(self.preprocess([p]))[0] for p in item.pixels]
        fitted = [fit(p, self.size, self.resize) for p in item.pixels]
        return replace(item, pixels=fitted, encoder_pixels=encoder_pixels)


def fit(image: torch.Tensor, size: tuple[int, int], mode: str = "crop") -> torch.Tensor:
    """``(3, h, w)`` pixels in [0, 1] -> ``(3, *size)``: ``crop`` resizes the image so that it
    covers ``size`` with its aspect ratio kept (the shorter side fits), then cuts the centre;
    ``squash`` resizes both sides to ``size``. Bilinear with antialiasing; an image of the
    right size comes back unchanged."""
    size = (int(size[0]), int(size[1]))
    if tuple(image.shape[-2:]) == size:
        return image
    h, w = image.shape[-2:]
    if mode == "crop":
        scale = max(size[0] / h, size[1] / w)
        inner = (max(size[0], round(h * scale)), max(size[1], round(w * scale)))
    else:
        inner = size
    out = F.interpolate(
        image[None].float(), size=inner, mode="bilinear", antialias=True, align_corners=False
    )[0].clamp(0, 1)
    top, left = (inner[0] - size[0]) // 2, (inner[1] - size[1]) // 2
    return out[:, top : top + size[0], left : left + size[1]]
