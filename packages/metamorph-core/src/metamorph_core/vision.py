"""Image reading and patch-grid reduction shared by every vision encoder, first- or third-party.

They live in core so that an encoder plugin needs nothing beyond metamorph-core.
Shapes: ``b`` images, ``h w`` patch grid, ``c`` channels.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange

REDUCTIONS = ("interpolate", "avgpool", "none")


def _from_path(path: str | Path) -> Any:
    try:
        from PIL import Image
    except ImportError as e:  # pillow is not a core dependency
        raise ImportError(
            f"reading image files such as '{path}' needs pillow: pip install pillow"
        ) from e
    try:
        with Image.open(path) as img:
            img.load()
            return img.copy()
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read image file '{path}': {e}") from e


def to_tensor(image: Any, index: int = 0) -> torch.Tensor:
    """One image -> ``(3, h, w)`` float32 in [0, 1].

    Accepts a file path, a PIL image of any mode (grayscale, RGBA, palette, ... are converted to
    RGB), an ``(h, w)`` / ``(h, w, c)`` array, or a tensor ``(c, h, w)`` / ``(h, w)``, with 1, 3
    or 4 channels (alpha is dropped). Integer pixels are 8-bit (0-255) or, when any exceeds 255,
    16-bit; float pixels must lie in [0, 1]. ``index`` names the image in errors.
    """
    if isinstance(image, (str, Path)):
        image = _from_path(image)
    if hasattr(image, "convert") and hasattr(image, "mode"):  # PIL
        image = image.convert("RGB")
    if not isinstance(image, torch.Tensor):
        try:
            import numpy as np

            arr = np.array(image, copy=True)
        except Exception as e:  # noqa: BLE001
            raise TypeError(
                f"image {index}: cannot read a {type(image).__name__} as pixels: {e}"
            ) from e
        if arr.dtype == object or arr.ndim not in (2, 3):
            raise ValueError(
                f"image {index}: expected an (h, w) or (h, w, c) array, got {type(image).__name__} "
                f"of shape {arr.shape}"
            )
        t = torch.from_numpy(arr)
        image = t[None] if t.dim() == 2 else t.permute(2, 0, 1)
    elif image.dim() == 2:
        image = image[None]
    if image.dim() != 3 or image.shape[0] not in (1, 3, 4):
        raise ValueError(
            f"image {index}: expected (c, h, w) with 1, 3 or 4 channels (or (h, w, c) for "
            f"arrays), got shape {tuple(image.shape)}"
        )
    if min(image.shape[-2:]) == 0:
        raise ValueError(f"image {index}: empty image of shape {tuple(image.shape)}")
    if image.dtype == torch.bool:
        x = image.float()
    elif not image.dtype.is_floating_point:  # integers: 8-bit (0-255) or, above that, 16-bit
        x = image.float()
        x = x / (255.0 if float(x.max()) <= 255 else 65535.0)
    else:
        x = image.float()
        lo, hi = float(x.min()), float(x.max())
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise ValueError(
                f"image {index}: float pixels must lie in [0, 1], got [{lo:.3g}, {hi:.3g}]; "
                "divide 0-255 values by 255 or pass uint8"
            )
    if x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    return x[:3].clamp(0.0, 1.0)


def to_tensor_list(images: Any) -> list[torch.Tensor]:
    """A batch (list/tuple, ``(b, c, h, w)`` tensor, or a single image) -> list of
    ``(3, h, w)`` float tensors of possibly different sizes."""
    if isinstance(images, torch.Tensor) and images.dim() == 4:
        items: list[Any] = list(images)
    elif isinstance(images, (list, tuple)):
        items = list(images)
    else:
        items = [images]
    return [to_tensor(img, i) for i, img in enumerate(items)]


def reduce_grid(
    tokens: torch.Tensor, grid: tuple[int, int], num_tokens: int | None, mode: str = "interpolate"
) -> torch.Tensor:
    """``(b, h*w, c)`` patch tokens on an ``h x w`` grid -> ``(b, num_tokens, c)``.

    ``interpolate``: bilinear in fp32, ``align_corners=False``, no antialias (the paper's
    reduction of SigLIP's 27x27 grid to 8x8). ``avgpool``: adaptive average pooling.
    ``none``: the tokens unchanged (``num_tokens`` must be ``h*w`` or ``None``).
    """
    h, w = grid
    if tokens.shape[1] != h * w:
        raise ValueError(f"expected {h}x{w}={h * w} patch tokens, got {tokens.shape[1]}")
    if mode not in REDUCTIONS:
        raise ValueError(f"unknown token reduction '{mode}'; use one of {', '.join(REDUCTIONS)}")
    if mode == "none" or num_tokens is None:
        if num_tokens not in (None, h * w):
            raise ValueError(
                f"reduction 'none' keeps the {h}x{w}={h * w} patch tokens but num_tokens="
                f"{num_tokens}; set num_tokens={h * w} or reduction='interpolate'/'avgpool'"
            )
        return tokens
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(f"num_tokens must be a square number (e.g. 64 = 8x8), got {num_tokens}")
    if mode == "avgpool" and (side > h or side > w):
        raise ValueError(
            f"avgpool cannot reduce a {h}x{w} patch grid to {side}x{side}={num_tokens} tokens; "
            "pick num_tokens at most the grid, or reduction='interpolate'"
        )
    if (side, side) == (h, w):
        return tokens
    x = rearrange(tokens.float(), "b (h w) c -> b c h w", h=h, w=w)
    if mode == "interpolate":
        x = F.interpolate(
            x, size=(side, side), mode="bilinear", align_corners=False, antialias=False
        )
    else:
        x = F.adaptive_avg_pool2d(x, (side, side))
    return rearrange(x, "b c h w -> b (h w) c")


def perturb_tokens(
    tokens: torch.Tensor, max_level: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Noise augmentation of visual tokens ``(b, n, c)``, for a model that is trained on true
    tokens but later fed imperfect, predicted ones (the decoder's noise conditioning
    augmentation, Ho et al. 2021; the LLM's fed-back tokens). Each of the ``b`` samples gets
    Gaussian noise at a level drawn uniformly from ``[0, max_level]``, relative to each token's
    RMS, and every token is scaled back to its own norm (L2-normalised tokens stay normalised):
    at level ``s`` the expected cosine to the true token is about ``1 / sqrt(1 + s**2)``. Noise
    and levels are drawn from ``generator`` (on its device) when given."""
    x = tokens.float()
    draw = generator.device if generator is not None else x.device
    level = torch.rand(x.shape[0], generator=generator, device=draw).to(x.device) * max_level
    noise = torch.randn(x.shape, generator=generator, device=draw).to(x.device)
    norm = x.norm(dim=-1, keepdim=True)
    y = x + level.view(-1, *([1] * (x.dim() - 1))) * norm / x.shape[-1] ** 0.5 * noise
    return (y * (norm / y.norm(dim=-1, keepdim=True).clamp(min=1e-12))).to(tokens.dtype)


class ImageRoot:
    """Resolves record image paths under ``root``. Absolute paths, ``..`` and symbolic links
    that lead outside the root are rejected."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise FileNotFoundError(f"image root '{root}' is not a directory")

    def resolve(self, relative: str, record_id: Any = None) -> Path:
        path = (self.root / relative).resolve()
        if not path.is_relative_to(self.root):
            raise ValueError(
                f"record {record_id!r}: image path '{relative}' leads outside the data root "
                f"'{self.root}'; paths must stay inside it"
            )
        return path

    def load(self, relative: str, record_id: Any = None) -> Any:
        """``(3, h, w)`` float tensor in [0, 1]; errors name the file and the record."""
        path = self.resolve(relative, record_id)
        if not path.is_file():
            raise FileNotFoundError(
                f"record {record_id!r}: image '{relative}' not found at '{path}'"
            )
        try:
            return to_tensor(path)
        except (ValueError, TypeError) as e:
            raise ValueError(f"record {record_id!r}: {e}") from e
