"""Input projectors: visual tokens (``c``) -> backbone embedding space (``d``).

``mlp{depth}x_gelu`` follows the paper's code: ``Linear(c, d)`` then ``depth - 1`` times
``GELU, Linear(d, d)``; ``mlp2x_gelu`` is the paper's projector.
"""

from __future__ import annotations

import torch
from torch import nn

from metamorph_core.interfaces import Projector


class MLPProjector(Projector):
    """``Linear(in_dim, out_dim)`` followed by ``depth - 1`` GELU + ``Linear(out_dim, out_dim)``."""

    def __init__(self, in_dim: int, out_dim: int, depth: int = 1) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"projector depth must be >= 1, got {depth}")
        self.in_dim, self.out_dim, self.depth = in_dim, out_dim, depth
        layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
        for _ in range(depth - 1):
            layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., c) -> (..., d)
        return self.net(x)


def linear(in_dim: int, out_dim: int) -> MLPProjector:
    return MLPProjector(in_dim, out_dim, depth=1)


def mlp_gelu(in_dim: int, out_dim: int, depth: int) -> MLPProjector:
    return MLPProjector(in_dim, out_dim, depth=depth)
