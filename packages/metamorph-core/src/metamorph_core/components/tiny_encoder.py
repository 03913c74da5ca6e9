"""``tiny-patch``: a tiny random-weight patch encoder for tests, examples and the toy world.

Not a pretrained model: a strided convolution over patches, a pointwise MLP, bilinear
reduction of the patch grid to ``num_tokens`` (fp32, ``align_corners=False``, no antialias, as
the paper reduces SigLIP's grid) and L2 normalisation. Its weights are a function of ``seed``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from metamorph_core.interfaces import VisionEncoder
from metamorph_core.vision import reduce_grid, to_tensor_list


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
        """Any images (see :func:`metamorph_core.vision.to_tensor`) -> ``(b, 3, s, s)`` in [-1, 1]."""
        out = [
            F.interpolate(x[None], size=self.image_size, mode="bilinear", antialias=True)[0]
            if tuple(x.shape[-2:]) != self.image_size
            else x
            for x in to_tensor_list(images)
        ]
        return torch.stack(out) * 2.0 - 1.0

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            x = self.patch(pixel_values.to(self.patch.weight.dtype))
            x = self.mlp(rearrange(x, "b c h w -> b (h w) c"))
            x = reduce_grid(x, self.grid, self.num_tokens).float()
            return F.normalize(x, p=2, dim=-1) if self.normalize else x
