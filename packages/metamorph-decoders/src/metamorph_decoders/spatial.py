"""Spatial conditioning for ``sd-unet`` (options ``spatial_channels`` and ``spatial_detail``): a
square grid of visual tokens laid over the UNet's input, each token over its own patch, as extra
input channels (InstructPix2Pix-style concatenation)."""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange

logger = logging.getLogger("metamorph")


class SpatialMap(torch.nn.Linear):
    """A linear map of each token to a ``detail`` x ``detail`` pattern of ``channels`` channels
    (no bias), laid out on the token grid and resized to the sample size. ``detail`` 1: one
    value per channel and token, upsampled nearest (each patch flat). ``detail`` d > 1: each
    token paints its own learned d x d pattern over its patch (a linear "unpatchify" at a
    coarse resolution), the ``(grid*d)^2`` map resized bilinearly to the sample. ``hidden`` h >
    0: the token first goes through ``Linear(token_dim, h)`` and GELU (``self.hidden``), so a
    token's pattern may depend on it non-linearly (e.g. a shape drawn where in the patch the
    token says it is). ``weight`` (``channels * detail**2`` rows) and, with ``hidden``, the
    hidden layer's weight and bias are what the decoder saves."""

    def __init__(
        self, token_dim: int, channels: int, num_tokens: int, detail: int = 1, hidden: int = 0
    ) -> None:
        if detail < 1:
            raise ValueError(f"spatial_detail must be >= 1 (1: one value per patch), got {detail}")
        super().__init__(hidden or token_dim, channels * detail * detail, bias=False)
        self.channels, self.detail = channels, detail
        self.num_tokens, self.grid = num_tokens, _token_grid(num_tokens)
        self.hidden = (
            torch.nn.Sequential(torch.nn.Linear(token_dim, hidden), torch.nn.GELU())
            if hidden
            else None
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(..., token_dim)`` -> ``(..., channels * detail**2)``."""
        return super().forward(tokens if self.hidden is None else self.hidden(tokens))

    def layout(self, tokens: torch.Tensor, side: int) -> torch.Tensor:
        """``(b, n, c)`` tokens -> ``(b, channels, side, side)``."""
        if tokens.shape[1] != self.num_tokens:
            raise ValueError(
                f"spatial conditioning needs the {self.num_tokens} tokens of a "
                f"{self.grid}x{self.grid} grid, got {tokens.shape[1]}"
            )
        out = self(tokens.to(self.weight.device, self.weight.dtype))  # (b, n, k d d)
        g, d = self.grid, self.detail
        if d == 1:
            grid = out.transpose(1, 2).reshape(tokens.shape[0], -1, g, g)
            return F.interpolate(grid, size=(side, side), mode="nearest")
        grid = rearrange(out, "b (gh gw) (k dh dw) -> b k (gh dh) (gw dw)", gh=g, dh=d, dw=d)
        if grid.shape[-1] == side:
            return grid
        return F.interpolate(grid, size=(side, side), mode="bilinear", align_corners=False)


def widen_conv_in(unet: Any, channels: int) -> None:
    """Give a pretrained UNet ``channels`` inputs: the new ones enter ``conv_in`` with zero
    weights (InstructPix2Pix), so its outputs are unchanged until they are trained."""
    old = unet.conv_in
    new = torch.nn.Conv2d(
        channels,
        old.out_channels,
        old.kernel_size,
        stride=old.stride,
        padding=old.padding,
        dtype=old.weight.dtype,
        device=old.weight.device,
    )
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, : old.in_channels].copy_(old.weight)
        new.bias.copy_(old.bias)
    unet.conv_in = new
    unet.register_to_config(in_channels=channels)
    logger.warning(
        "UNet conv_in widened %d -> %d input channels for spatial conditioning (new weights zero)",
        old.in_channels,
        channels,
    )


def _token_grid(num_tokens: int) -> int:
    side = round(num_tokens**0.5)
    if side * side != num_tokens:
        raise ValueError(
            f"spatial_channels needs a square grid of tokens, but num_tokens={num_tokens}; use "
            "spatial_channels=0 (cross-attention only) for tokens that are not a patch grid"
        )
    return side
