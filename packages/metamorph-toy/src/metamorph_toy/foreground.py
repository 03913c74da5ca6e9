"""The judge's classical stage: where the one shape of a toy-world image is, with no learning.

Background = per-channel median of the border of the 3x3-box-blurred image; foreground = pixels
farther than ``fg_threshold`` from it. An image holds one plausible object when its largest
8-connected foreground blob is big enough (``min_area``), the foreground not too large
(``max_area``) and mostly that blob (``min_main_fraction``). The blob's centroid gives the
position (:func:`position_of`) and centres the window the judge's CNN sees
(:func:`crop_around`). Numpy: many tiny steps, cheaper than torch ops at this size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from metamorph_toy.world import IMAGE_SIZE, POSITIONS

UNRECOGNISED = "unrecognised"
CROP = 16  # side of the window around the object that the CNN sees


class GateThresholds(Protocol):
    """The thresholds :func:`find_foreground` reads (a judge's ``JudgeConfig`` has them)."""

    fg_threshold: float  # RGB distance in [0, 1] units from the background
    min_area: int  # pixels of the largest foreground blob
    max_area: int  # pixels of all foreground
    min_main_fraction: float  # share of the foreground in the largest blob


@dataclass
class Foreground:
    """What the classical stage finds in a batch of ``n`` images."""

    accepted: torch.Tensor  # (n,) bool: one plausible object
    background: torch.Tensor  # (n, 3): border median of the box-blurred image
    centre: torch.Tensor  # (n, 2): (x, y) centroid of the largest blob in pixels
    area: torch.Tensor  # (n,): foreground pixels
    largest: torch.Tensor  # (n,): pixels of the largest 8-connected blob


def _max3x3(a: np.ndarray) -> np.ndarray:
    """3x3 maximum filter of ``a`` ``(n, h, w)`` (non-negative), zero outside."""
    p = np.pad(a, ((0, 0), (1, 1), (1, 1)))
    rows = np.maximum(np.maximum(p[:, :, :-2], p[:, :, 1:-1]), p[:, :, 2:])
    return np.maximum(np.maximum(rows[:, :-2], rows[:, 1:-1]), rows[:, 2:])


def component_labels(mask: np.ndarray) -> np.ndarray:
    """``(n, h, w)`` int64: one id per 8-connected component of ``mask`` ``(n, h, w)``, 0 off
    it. Each pixel starts with its own id (index + 1); the largest id spreads through its
    component by 3x3 maximum filtering and pointer jumping, on the images not yet settled."""
    n, h, w = mask.shape
    on = mask.reshape(n, h * w)
    labels = np.where(on, np.arange(1, h * w + 1), 0)
    active = np.arange(n)
    while active.size:
        now, keep = labels[active], on[active]
        spread = _max3x3(now.reshape(-1, h, w)).reshape(-1, h * w) * keep
        jumped = np.take_along_axis(spread, np.maximum(spread - 1, 0), axis=1) * keep
        spread = np.maximum(spread, jumped)  # the label of the pixel that the label names
        labels[active] = spread
        active = active[(spread != now).any(axis=1)]
    return labels.reshape(n, h, w)


def find_foreground(x: torch.Tensor, config: GateThresholds) -> Foreground:
    """Run the classical stage on ``x`` ``(n, 3, h, w)`` in [0, 1] (see the module
    docstring) with ``config``'s thresholds."""
    a = x.detach().cpu().numpy()
    n, _, h, w = a.shape
    padded = np.pad(a, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="edge")
    rows = padded[..., :-2] + padded[..., 1:-1] + padded[..., 2:]
    smooth = (rows[..., :-2, :] + rows[..., 1:-1, :] + rows[..., 2:, :]) / 9  # 3x3 box blur
    border = np.concatenate(
        [smooth[..., 0, :], smooth[..., -1, :], smooth[..., 1:-1, 0], smooth[..., 1:-1, -1]],
        axis=-1,
    )
    background = np.median(border, axis=-1)  # n 3
    mask = np.linalg.norm(smooth - background[:, :, None, None], axis=1) > config.fg_threshold
    labels = component_labels(mask)
    slots = h * w + 1
    flat = (labels + slots * np.arange(n)[:, None, None]).ravel()
    counts = np.bincount(flat, minlength=n * slots).reshape(n, slots)[:, 1:]
    best, largest = counts.argmax(axis=1) + 1, counts.max(axis=1)
    main = (labels == best[:, None, None]) & mask
    total = np.maximum(main.sum(axis=(1, 2)), 1)
    cx = (main.sum(axis=1) * (np.arange(w) + 0.5)).sum(axis=1) / total
    cy = (main.sum(axis=2) * (np.arange(h) + 0.5)).sum(axis=1) / total
    centre = np.where((largest > 0)[:, None], np.stack([cx, cy], axis=1), [w / 2, h / 2])
    area = mask.reshape(n, -1).sum(axis=1)
    accepted = (
        (largest >= config.min_area)
        & (area <= config.max_area)
        & (largest >= config.min_main_fraction * area)
    )
    return Foreground(
        accepted=torch.from_numpy(accepted),
        background=torch.from_numpy(background.astype(np.float32)),
        centre=torch.from_numpy(centre.astype(np.float32)),
        area=torch.from_numpy(area),
        largest=torch.from_numpy(largest),
    )


def gate(x: torch.Tensor, config: GateThresholds) -> torch.Tensor:
    """``(n,)`` bool: whether each image of ``x`` ``(n, 3, h, w)`` in [0, 1] holds one
    plausible object."""
    return find_foreground(x, config).accepted


def crop_around(x: torch.Tensor, background: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """``(n, 3, CROP, CROP)``: ``x`` minus its ``background`` ``(n, 3)`` in a window centred on
    ``centre`` ``(n, 2)`` (x, y pixels); zero (background) outside the image."""
    n = x.shape[0]
    half = CROP // 2
    diff = F.pad(x - background[:, :, None, None], (half, half, half, half))
    left = centre.round().long()  # window start in padded coordinates: centre - half + half
    rows = (left[:, 1:] + torch.arange(CROP)).clamp(0, diff.shape[2] - 1)  # n CROP
    cols = (left[:, :1] + torch.arange(CROP)).clamp(0, diff.shape[3] - 1)
    out = diff[torch.arange(n)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2)  # n CROP CROP 3 -> n 3 CROP CROP


def position_of(centre: torch.Tensor, margin: float) -> list[str]:
    """The 3x3 cell of each ``centre`` ``(n, 2)`` (x, y pixels at 32x32), or
    ``"unrecognised"`` within ``margin`` pixels of a boundary between two cells."""
    cell = IMAGE_SIZE / 3
    index = (centre / cell).floor().long().clamp(0, 2)  # n 2: column, row
    to_boundary = (centre[:, :, None] - torch.tensor([cell, 2 * cell])).abs().amin(dim=(1, 2))
    return [
        UNRECOGNISED if near else POSITIONS[3 * int(row) + int(col)]
        for (col, row), near in zip(index.tolist(), (to_boundary < margin).tolist(), strict=True)
    ]


def as_batch(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """``(n, 3, 32, 32)`` float32 in [0, 1] from a float tensor ``(n, 3, h, w)`` in [0, 1] or
    a uint8 array ``(n, h, w, 3)``; other sizes are resized (bilinear, antialiased)."""
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8:
            raise ValueError(
                f"a numpy batch must be uint8 (n, h, w, 3), got {images.dtype}; pass floats "
                "in [0, 1] as a torch tensor (n, 3, h, w)"
            )
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(
                f"a numpy batch must be (n, h, w, 3), got {images.shape}; add a batch "
                "dimension with images[None]"
            )
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    elif isinstance(images, torch.Tensor):
        if not images.is_floating_point():
            raise ValueError(
                f"a tensor batch must hold floats in [0, 1], got {images.dtype}; for uint8 "
                "pixels pass images.float() / 255"
            )
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                f"a tensor batch must be (n, 3, h, w), got {tuple(images.shape)}; add a batch "
                "dimension with images[None]"
            )
        x = images.detach().float().cpu()
        if x.numel() and (x.min() < -0.01 or x.max() > 1.01):
            raise ValueError(
                f"image values must lie in [0, 1], got [{x.min():.3f}, {x.max():.3f}]; "
                "divide uint8 images by 255 or map [-1, 1] images with (x + 1) / 2"
            )
        x = x.clamp(0, 1)
    else:
        raise TypeError(f"images must be a torch tensor or numpy array, got {type(images)}")
    if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
        x = F.interpolate(x, size=IMAGE_SIZE, mode="bilinear", antialias=True, align_corners=False)
    return x.contiguous()
