"""``tiny-patch``: a tiny random-weight patch encoder for tests, examples and the toy world.

Not a pretrained model: a strided convolution over patches, a pointwise MLP, bilinear
reduction of the patch grid to ``num_tokens`` (fp32, ``align_corners=False``, no antialias, as
the paper reduces SigLIP's grid) and L2 normalisation. Its weights are a function of ``seed``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from metamorph_core.interfaces import VisionEncoder


def to_pixel_batch(images: Any, size: tuple[int, int]) -> torch.Tensor:
    """Tensors ``(3, h, w)`` / ``(b, 3, h, w)`` (float in [0, 1] or uint8), HWC arrays or PIL
    images (any mode) -> ``(b, 3, *size)`` float in [0, 1]."""
    if isinstance(images, torch.Tensor) and images.dim() == 4:
        items: list[Any] = list(images)
    elif isinstance(images, (list, tuple)):
        items = list(images)
    else:
        items = [images]
    out = []
    for i, img in enumerate(items):
        if hasattr(img, "convert") and hasattr(img, "mode"):  # PIL image
            img = img.convert("RGB")
        if not isinstance(img, torch.Tensor):
            try:
                import numpy as np

                arr = np.asarray(img)
            except Exception as e:  # noqa: BLE001
                raise TypeError(
                    f"image {i}: cannot read {type(img).__name__} as pixels: {e}"
                ) from e
            if arr.ndim == 2:
                arr = np.repeat(arr[..., None], 3, axis=-1)
            if arr.ndim != 3:
                raise ValueError(f"image {i}: expected an (h, w, c) array, got shape {arr.shape}")
            img = torch.from_numpy(np.array(arr, copy=True)).permute(2, 0, 1)
        if img.dim() != 3 or img.shape[0] not in (1, 3, 4):
            raise ValueError(
                f"image {i}: expected a (3, h, w) tensor (1 or 4 channels are converted), got "
                f"shape {tuple(img.shape)}"
            )
        img = img.float() / 255.0 if img.dtype == torch.uint8 else img.float()
        if img.shape[0] == 1:
            img = img.expand(3, -1, -1)
        elif img.shape[0] == 4:
            img = img[:3]
        if tuple(img.shape[-2:]) != tuple(size):
            img = F.interpolate(img[None], size=size, mode="bilinear", antialias=True)[0]
        out.append(img.clamp(0.0, 1.0))
    return torch.stack(out)


def reduce_grid(tokens: torch.Tensor, grid: tuple[int, int], num_tokens: int) -> torch.Tensor:
    """``(b, h*w, c)`` patch tokens on an ``h x w`` grid -> ``(b, num_tokens, c)`` by bilinear
    interpolation in fp32 (``align_corners=False``, no antialias), as the paper does."""
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(f"num_tokens must be a square number (e.g. 64 = 8x8), got {num_tokens}")
    if (side, side) == tuple(grid):
        return tokens
    x = rearrange(tokens.float(), "b (h w) c -> b c h w", h=grid[0], w=grid[1])
    x = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False, antialias=False)
    return rearrange(x, "b c h w -> b (h w) c").to(tokens.dtype)


class TinyPatchEncoder(VisionEncoder):
    """Random-weight patch encoder; ``(b, 3, s, s)`` -> ``(b, num_tokens, hidden_size)``."""

    def __init__(
        self,
        image_size: int = 32,
        patch_size: int = 4,
        hidden_size: int = 32,
        num_tokens: int = 16,
        normalize: bool = True,
        frozen: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(
                f"image_size {image_size} is not a multiple of patch_size {patch_size}"
            )
        self.image_size = (image_size, image_size)
        self.grid = (image_size // patch_size, image_size // patch_size)
        self.hidden_size, self.num_tokens, self.normalize = hidden_size, num_tokens, normalize
        self.frozen = frozen
        reduce_grid(torch.zeros(1, self.grid[0] * self.grid[1], 1), self.grid, num_tokens)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.patch = nn.Conv2d(3, hidden_size, kernel_size=patch_size, stride=patch_size)
            self.mlp = nn.Sequential(
                nn.GELU(),
                nn.Linear(hidden_size, hidden_size),
                nn.GELU(),
                nn.Linear(hidden_size, hidden_size),
            )
        if frozen:
            self.requires_grad_(False)
            self.eval()

    def preprocess(self, images: Any) -> torch.Tensor:
        return to_pixel_batch(images, self.image_size) * 2.0 - 1.0

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch(pixel_values.to(self.patch.weight.dtype))
        x = self.mlp(rearrange(x, "b c h w -> b (h w) c"))
        x = reduce_grid(x, self.grid, self.num_tokens)
        return F.normalize(x, p=2, dim=-1) if self.normalize else x
