"""Vision heads: final backbone hidden state (``d``) -> predicted visual token (``c``).

As the paper's code defines them *for heads* (docs/method.md): ``mlp`` is ``Linear(d, d) GELU
Linear(d, c)``, the head every training script of the research code uses (the default);
``mlp{depth}x_gelu`` is ``depth`` times ``Linear(d, d) GELU`` then ``Linear(d, c)`` (so
``mlp2x_gelu`` has three linears: defined in the research code, unused by its scripts);
``linear`` is ``Linear(d, c)``. Outputs are L2-normalised by default, matching the normalised
encoder targets.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from metamorph_core.interfaces import VisionHead


class MLPHead(VisionHead):
    """``hidden_layers`` x (``Linear(d, d)``, GELU), then ``Linear(d, c)``; optional L2 norm."""

    def __init__(
        self, in_dim: int, out_dim: int, hidden_layers: int = 0, normalize: bool = True
    ) -> None:
        super().__init__()
        if hidden_layers < 0:
            raise ValueError(f"vision head hidden_layers must be >= 0, got {hidden_layers}")
        self.in_dim, self.out_dim, self.normalize = in_dim, out_dim, normalize
        layers: list[nn.Module] = []
        for _ in range(hidden_layers):
            layers += [nn.Linear(in_dim, in_dim), nn.GELU()]
        layers.append(nn.Linear(in_dim, out_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # (..., d) -> (..., c)
        out = self.net(hidden)
        return F.normalize(out, p=2, dim=-1) if self.normalize else out


def linear(in_dim: int, out_dim: int, normalize: bool = True) -> MLPHead:
    return MLPHead(in_dim, out_dim, hidden_layers=0, normalize=normalize)


def mlp(in_dim: int, out_dim: int, normalize: bool = True) -> MLPHead:
    return MLPHead(in_dim, out_dim, hidden_layers=1, normalize=normalize)


def mlp_gelu(in_dim: int, out_dim: int, depth: int, normalize: bool = True) -> MLPHead:
    return MLPHead(in_dim, out_dim, hidden_layers=depth, normalize=normalize)
