"""Image preprocessing taken from a model's own processor or data config.

:class:`ImageTransform` resizes, centre-crops and normalises on torch tensors, one image at a
time, so a batch may mix sizes and kinds (paths, PIL images of any mode, arrays, tensors; see
:func:`metamorph_core.vision.to_tensor`). Resizing uses ``torch`` interpolation with
antialiasing, which approximates PIL's filters: expect differences of about 1/255 against a
transformers image processor, not bit equality.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from metamorph_core.vision import to_tensor_list

# PIL resample codes used in processor configs -> torch modes
_RESAMPLE = {0: "nearest", 1: "bicubic", 2: "bilinear", 3: "bicubic", 4: "bilinear", 5: "bicubic"}


def _pair(value: Any) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    return (int(value[0]), int(value[1]))


@dataclass(frozen=True)
class ImageTransform:
    """``resize``: ``None`` (straight to ``size``), an int (shortest edge, aspect kept) or
    ``(h, w)``; then an optional centre crop to ``size``; then ``(x - mean) / std``."""

    size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: int | tuple[int, int] | None = None
    center_crop: bool = False
    interpolation: str = "bicubic"
    crop_rounding: str = "floor"  # crop offset: "floor" as transformers, "round" as torchvision

    def __post_init__(self) -> None:
        if self.interpolation not in ("nearest", "bilinear", "bicubic"):
            raise ValueError(f"unknown interpolation '{self.interpolation}'")
        object.__setattr__(self, "size", _pair(self.size))
        if isinstance(self.resize, (list, tuple)):
            object.__setattr__(self, "resize", _pair(self.resize))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    def __call__(self, images: Any) -> torch.Tensor:
        """Images -> ``(b, 3, h, w)`` normalised float32."""
        return torch.stack([self._one(x) for x in to_tensor_list(images)])

    def _resize(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if tuple(x.shape[-2:]) == size:
            return x
        antialias = self.interpolation != "nearest"
        y = F.interpolate(x[None], size=size, mode=self.interpolation, antialias=antialias)[0]
        return y.clamp(0.0, 1.0)

    def _one(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if self.resize is None:
            x = self._resize(x, self.size)
        elif isinstance(self.resize, int):  # shortest edge; the longer one truncated, as HF
            short, long = (h, w) if h <= w else (w, h)
            other = max(1, int(self.resize * long / short))
            x = self._resize(x, (self.resize, other) if h <= w else (other, self.resize))
        else:
            x = self._resize(x, self.resize)
        if self.center_crop and tuple(x.shape[-2:]) != self.size:
            th, tw = self.size
            if x.shape[-2] < th or x.shape[-1] < tw:
                x = self._resize(x, (max(th, x.shape[-2]), max(tw, x.shape[-1])))
            offset = (
                (lambda n: n // 2)
                if self.crop_rounding == "floor"
                else (lambda n: int(round(n / 2)))
            )
            top, left = offset(x.shape[-2] - th), offset(x.shape[-1] - tw)
            x = x[:, top : top + th, left : left + tw]
        elif tuple(x.shape[-2:]) != self.size:
            x = self._resize(x, self.size)
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (x - mean) / std

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ImageTransform:
        return cls(**data)

    @classmethod
    def from_hf_processor(cls, processor: Any) -> ImageTransform:
        """From a transformers image processor (SigLIP, CLIP, BiT/DINOv2, ...)."""
        size = getattr(processor, "size", None) or {}
        size = dict(size) if not isinstance(size, dict) else size
        crop = getattr(processor, "crop_size", None)
        crop = dict(crop) if crop is not None and not isinstance(crop, dict) else crop
        do_crop = bool(getattr(processor, "do_center_crop", False)) and bool(crop)
        if size.get("shortest_edge"):
            resize: int | tuple[int, int] | None = int(size["shortest_edge"])
        elif size.get("height"):
            resize = (int(size["height"]), int(size["width"]))
        else:
            raise ValueError(
                f"image processor {type(processor).__name__} has no usable size: {size}"
            )
        out = (int(crop["height"]), int(crop["width"])) if do_crop else resize
        if isinstance(out, int):  # shortest edge without a crop: a square of that edge
            out, do_crop = (out, out), True
        resample = getattr(processor, "resample", 3)
        resample = int(getattr(resample, "value", resample) or 3)
        return cls(
            size=out,
            mean=tuple(processor.image_mean),
            std=tuple(processor.image_std),
            resize=resize,
            center_crop=do_crop,
            interpolation=_RESAMPLE.get(resample, "bicubic"),
        )

    @classmethod
    def from_timm(cls, data_config: dict[str, Any]) -> ImageTransform:
        """From ``timm.data.resolve_model_data_config(model)``, following timm's eval transform:
        ``squash`` resizes both edges to ``size / crop_pct``; ``center`` (the default) resizes
        the shortest edge, keeping the aspect ratio; both then centre-crop to ``size``."""
        _, h, w = data_config["input_size"]
        crop_pct = data_config.get("crop_pct") or 0.875
        mode = data_config.get("crop_mode") or "center"
        interpolation = data_config.get("interpolation", "bicubic")
        interpolation = (
            interpolation if interpolation in ("nearest", "bilinear", "bicubic") else "bicubic"
        )
        scale = (math.floor(h / crop_pct), math.floor(w / crop_pct))
        if mode == "squash":
            resize: int | tuple[int, int] = scale
        elif mode == "center" and scale[0] == scale[1]:
            resize = scale[0]
        elif mode == "center":
            raise ValueError(
                f"timm data config: centre crops to a non-square size {(h, w)} are not supported; "
                "pass image_transform= explicitly"
            )
        else:
            raise ValueError(
                f"timm data config: crop_mode '{mode}' is not supported (squash and center are); "
                "pass image_transform= explicitly"
            )
        return cls(
            size=(h, w),
            mean=tuple(data_config["mean"]),
            std=tuple(data_config["std"]),
            resize=resize,
            center_crop=True,
            interpolation=interpolation,
            crop_rounding="round",
        )

    @classmethod
    def from_open_clip(cls, preprocess: dict[str, Any]) -> ImageTransform:
        """From an open_clip preprocess config (``size``, ``mean``, ``std``, ``interpolation``,
        ``resize_mode``), following open_clip's eval transform: ``shortest`` resizes the
        shortest edge to the (square) size and centre-crops, ``squash`` resizes both edges."""
        size = _pair(preprocess["size"])
        mode = preprocess.get("resize_mode") or "shortest"
        interpolation = preprocess.get("interpolation") or "bicubic"
        if interpolation not in ("nearest", "bilinear", "bicubic"):
            raise ValueError(
                f"open_clip preprocess config: interpolation '{interpolation}' is not supported "
                "(bicubic, bilinear and nearest are); pass image_transform= explicitly"
            )
        if mode == "squash":
            resize: int | None = None
        elif mode == "shortest" and size[0] == size[1]:
            resize = size[0]
        else:
            shape = " to a non-square size" if mode == "shortest" else ""
            raise ValueError(
                f"open_clip preprocess config: resize_mode '{mode}'{shape} is not supported "
                "(shortest to a square and squash are); pass image_transform= explicitly"
            )
        return cls(
            size=size,
            mean=tuple(preprocess["mean"]),
            std=tuple(preprocess["std"]),
            resize=resize,
            center_crop=resize is not None,
            interpolation=interpolation,
            crop_rounding="round",  # torchvision's CenterCrop
        )
