"""``siglip2``: transformers' SigLIP 2 vision tower, NaFlex or at a fixed resolution.

SigLIP 2 takes patchified images: ``pixel_values`` ``(b, max_num_patches, 3*p*p)`` with a
``pixel_attention_mask`` ``(b, max_num_patches)`` and each image's patch grid ``spatial_shapes``
``(b, 2)``; its position embeddings are resized to every grid. Two modes of
:meth:`preprocess` / :meth:`forward` (the :class:`VisionEncoder` contract, used by the unified
model, its data loaders and generation):

- ``naflex=True`` (default): each image keeps its aspect ratio on an ``h_i x w_i`` grid with
  ``h_i*w_i <= max_num_patches``; ``preprocess`` gives those three fields as a dict
  (:mod:`metamorph_core.pixels`), the same as :meth:`preprocess_naflex`, and ``forward`` is
  :meth:`encode_naflex`.
- ``naflex=False``: square ``s*p x s*p`` pixel tensors, ``s = isqrt(max_num_patches)``.

Both reduce each image's valid patch grid to the same ``num_tokens`` (``interpolate`` /
``avgpool``; ``none`` only where a grid already has ``num_tokens`` patches).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
from einops import rearrange

from metamorph_core.pixels import Pixels
from metamorph_core.vision import reduce_grid, to_tensor_list
from metamorph_encoders.hf import HFVisionEncoder
from metamorph_encoders.transforms import ImageTransform

# torch interpolation modes -> PIL resample codes, for the NaFlex image processor
_PIL_RESAMPLE = {"nearest": 0, "bilinear": 2, "bicubic": 3}
_NAFLEX_FIELDS = ("pixel_values", "pixel_attention_mask", "spatial_shapes")


class Siglip2Encoder(HFVisionEncoder):
    """Options of ``siglip``, plus ``max_num_patches`` (the patch budget per image; default:
    the checkpoint's image processor's, else the config's ``num_patches``) and ``naflex``
    (default on: aspect ratios kept; off: square images of ``isqrt(max_num_patches)``
    patches a side). ``image_size`` is that square either way."""

    family = "siglip2"
    model_class = "Siglip2VisionModel"
    config_class = "Siglip2VisionConfig"
    fixed_resolution = False  # position embeddings are resized to any grid
    default_interpolation = "bilinear"
    load_overrides: ClassVar[dict[str, Any]] = {"vision_use_head": False}

    def __init__(
        self,
        *args: Any,
        max_num_patches: int | None = None,
        naflex: bool = True,
        **kwargs: Any,
    ) -> None:
        self._requested_patches = max_num_patches
        self._processor_patches: int | None = None  # read from the checkpoint's processor
        super().__init__(*args, **kwargs)
        cfg = self.model.config
        self.patch_size = int(cfg.patch_size)
        self.max_num_patches = self._default_patches(cfg)
        from transformers import Siglip2ImageProcessor

        self.processor = Siglip2ImageProcessor(
            patch_size=self.patch_size,
            max_num_patches=self.max_num_patches,
            image_mean=list(self.transform.mean),
            image_std=list(self.transform.std),
            resample=_PIL_RESAMPLE.get(self.transform.interpolation, 2),
            do_rescale=False,  # images arrive as [0, 1] floats from to_tensor_list
        )
        self.naflex = naflex
        self._options["max_num_patches"] = self.max_num_patches
        self._options["naflex"] = naflex

    def _default_patches(self, cfg: Any) -> int:
        return int(self._requested_patches or self._processor_patches or cfg.num_patches)

    def _native_size(self, cfg: Any) -> tuple[int, int]:
        side = math.isqrt(self._default_patches(cfg)) * cfg.patch_size
        return (side, side)

    def _transform_for(self, pretrained: str | Path | None, cfg: Any) -> ImageTransform:
        if pretrained is not None:
            from transformers import AutoImageProcessor

            try:
                processor = AutoImageProcessor.from_pretrained(str(pretrained))
            except (OSError, ValueError):
                processor = None
            if processor is not None and getattr(processor, "max_num_patches", None):
                if int(processor.patch_size) != int(cfg.patch_size):
                    raise ValueError(
                        f"encoder 'siglip2': the image processor in '{pretrained}' cuts "
                        f"{processor.patch_size}-pixel patches but the model embeds "
                        f"{cfg.patch_size}-pixel ones; fix patch_size in its "
                        "preprocessor_config.json"
                    )
                self._processor_patches = int(processor.max_num_patches)
                resample = getattr(processor, "resample", 2)
                resample = int(getattr(resample, "value", resample))
                return ImageTransform(
                    size=self._native_size(cfg),
                    mean=tuple(processor.image_mean),
                    std=tuple(processor.image_std),
                    interpolation={0: "nearest", 3: "bicubic"}.get(resample, "bilinear"),
                )
        return super()._transform_for(None, cfg)

    def _layer_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        h, w = self.grid
        patches = rearrange(
            pixel_values, "b c (h p) (w q) -> b (h w) (p q c)", p=self.patch_size, q=self.patch_size
        )
        mask = torch.ones(patches.shape[:2], dtype=torch.long, device=patches.device)
        shapes = torch.tensor([[h, w]], device=patches.device).expand(patches.shape[0], 2)
        return self._hidden(patches, mask, shapes)

    def _hidden(
        self, pixel_values: torch.Tensor, mask: torch.Tensor, spatial_shapes: torch.Tensor
    ) -> torch.Tensor:
        """Patches ``(b, n, 3*p*p)`` -> ``(b, n, c)`` at ``self.layer`` (padding rows included)."""
        out = self.model(
            pixel_values=pixel_values.to(self.model.dtype),
            pixel_attention_mask=mask,
            spatial_shapes=spatial_shapes,
            output_hidden_states=True,
        )
        return out.hidden_states[self.layer]

    def preprocess(self, images: Any) -> Pixels:
        """NaFlex inputs (:meth:`preprocess_naflex`), or with ``naflex=False`` square
        ``(b, 3, s*p, s*p)`` pixel values."""
        return self.preprocess_naflex(images) if self.naflex else super().preprocess(images)

    def forward(self, pixel_values: Pixels) -> torch.Tensor:
        """What :meth:`preprocess` gives -> ``(b, num_tokens, hidden_size)``."""
        if not self.naflex:
            return super().forward(pixel_values)
        if not isinstance(pixel_values, Mapping) or set(pixel_values) != set(_NAFLEX_FIELDS):
            got = (
                f"fields {sorted(pixel_values)}"
                if isinstance(pixel_values, Mapping)
                else f"a tensor of shape {tuple(pixel_values.shape)}"
            )
            raise ValueError(
                f"encoder 'siglip2' reads NaFlex inputs (a dict of {', '.join(_NAFLEX_FIELDS)}), "
                f"got {got}; use encoder.preprocess(images), or build the encoder with "
                "naflex=False for square pixel tensors"
            )
        return self.encode_naflex(**pixel_values)

    def preprocess_naflex(self, images: Any) -> dict[str, torch.Tensor]:
        """Images (paths, PIL images, arrays, tensors) -> NaFlex inputs: each image resized, aspect
        kept, to an ``h_i x w_i`` patch grid with ``h_i*w_i <= max_num_patches``;
        ``pixel_values`` ``(b, max_num_patches, 3*p*p)`` float32 (padding rows zero),
        ``pixel_attention_mask`` ``(b, max_num_patches)``, ``spatial_shapes`` ``(b, 2)``."""
        out = self.processor(images=to_tensor_list(images), return_tensors="pt")
        return {k: out[k] for k in _NAFLEX_FIELDS}

    def encode_naflex(
        self,
        pixel_values: torch.Tensor,
        pixel_attention_mask: torch.Tensor,
        spatial_shapes: torch.Tensor,
    ) -> torch.Tensor:
        """NaFlex inputs (see :meth:`preprocess_naflex`) -> ``(b, num_tokens, hidden_size)``:
        each image's valid ``h_i*w_i`` tokens, as its grid, reduced to ``num_tokens``."""
        if pixel_values.dim() != 3 or pixel_values.shape[-1] != 3 * self.patch_size**2:
            raise ValueError(
                f"encoder 'siglip2' expects NaFlex pixel_values (b, n, {3 * self.patch_size**2}), "
                f"got {tuple(pixel_values.shape)}; use encoder.preprocess_naflex(images)"
            )
        shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
        if self.reduction == "none":
            for i, (h, w) in enumerate(shapes):
                if h * w != self.num_tokens:
                    raise ValueError(
                        f"encoder 'siglip2': reduction 'none' needs every image's grid to hold "
                        f"num_tokens={self.num_tokens} patches, but image {i} has {h}x{w}="
                        f"{h * w}; use reduction='interpolate' or 'avgpool'"
                    )
        device = pixel_values.device
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            x = self._hidden(
                pixel_values, pixel_attention_mask.to(device), spatial_shapes.to(device)
            )
            tokens = [
                reduce_grid(x[i : i + 1, : h * w], (h, w), self.num_tokens, self.reduction)
                for i, (h, w) in enumerate(shapes)
            ]
            return self._finish(torch.cat(tokens))
