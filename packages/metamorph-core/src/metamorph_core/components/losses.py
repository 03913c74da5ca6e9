"""Visual losses, per token: ``(t, c)`` predictions and targets -> ``(t,)``.

The model sums them over target tokens and divides by the count, so ranks and accumulation
steps can be reduced exactly (docs/method.md, "Losses").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from metamorph_core.interfaces import VisualLoss


class CosineLoss(VisualLoss):
    """``1 - cos(pred, target)`` (the paper's loss, up to its constant)."""

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return 1.0 - F.cosine_similarity(pred.float(), target.float(), dim=-1)


class MSELoss(VisualLoss):
    """Mean over channels of the squared error."""

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (pred.float() - target.float()).pow(2).mean(dim=-1)


class L1Loss(VisualLoss):
    """Mean over channels of the absolute error."""

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (pred.float() - target.float()).abs().mean(dim=-1)
