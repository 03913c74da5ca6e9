"""Images named by records, read relative to a data root that no path may escape
(:class:`metamorph_core.vision.ImageRoot`, shared with evaluation), and kept decoded in memory
when a run asks for it (:class:`ImageMemory`, ``data.image_memory_mb``)."""

from __future__ import annotations

from typing import Any

import torch

from metamorph_core.vision import ImageRoot

__all__ = ["ImageMemory", "ImageRoot"]


class ImageMemory:
    """Decoded image files kept in this process's memory, up to ``limit_mb`` MiB: a run that
    draws the same files many times (several epochs of a small set) reads and decodes each
    once. Images are kept in the order first read until the limit is reached; later ones are
    read from disk each time. Every call returns a copy, so what a caller does to an image
    never reaches the kept one. Each data-loader worker process keeps its own."""

    def __init__(self, limit_mb: float) -> None:
        if not limit_mb > 0:
            raise ValueError(f"ImageMemory: limit_mb must be > 0, got {limit_mb!r}")
        self.limit = int(limit_mb * 2**20)
        self.used = 0  # bytes kept
        self.hits = 0
        self.misses = 0
        self._kept: dict[tuple[str, str], torch.Tensor] = {}

    def load(self, root: ImageRoot, relative: str, record_id: Any = None) -> torch.Tensor:
        """``root.load(relative)``: ``(3, h, w)`` float in [0, 1], from memory when kept."""
        key = (str(root.root), relative)
        kept = self._kept.get(key)
        if kept is not None:
            self.hits += 1
            return kept.clone()
        self.misses += 1
        image = root.load(relative, record_id)
        size = image.numel() * image.element_size()
        if self.used + size <= self.limit:
            self._kept[key] = image.clone()
            self.used += size
        return image
