"""The batch's sequences on the backbone during generation (:class:`Rows`): the KV cache (or
recomputation), rows joining and leaving, the static cache growing."""

from __future__ import annotations

import functools
from typing import Any

import torch

from metamorph_core.generation.static_cache import (
    CACHE_POOL,
    bucket,
    compiled_step,
    every_layer,
    growable,
)


class Rows:
    """The batch's sequences on the backbone: a KV cache, or (``use_cache=False``) the whole
    sequence recomputed at every step. Finished rows keep a place (masked, position frozen)
    unless :meth:`keep` drops them; :meth:`merge` adds prefilled rows (joining mid-generation).
    ``static_length``: the cache is allocated for that many positions and every step sees the
    whole ``(r, static_length)`` mask (same shapes each step); when the batch outgrows it, a
    cache of twice the length (at most ``static_max``) takes its place — a new shape, so a new
    compiled graph — unless a layer is a sliding window, whose cache is allocated at
    ``static_max`` from the start; the rows are padded to
    a power of two with copies of the last one (their outputs dropped), so that batches of
    nearby sizes share a compiled graph. ``compiled``: the steps run through the backbone's
    compiled forward (:func:`~.static_cache.compiled_step`).
    """

    def __init__(
        self,
        backbone: Any,
        embeds: torch.Tensor,
        mask: torch.Tensor,
        use_cache: bool,
        static_length: int | None = None,
        compiled: bool = False,
        static_max: int | None = None,
    ) -> None:
        self.backbone, self.use_cache = backbone, use_cache
        self.mask = mask  # (r, l) long
        self.positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (r, l)
        self.next_position = self.positions[:, -1] + 1  # (r,)
        self.embeds = embeds  # (r, l, d); only the last step's when cached
        self.cache: Any = None
        self.static_length = static_length
        self.static_max = static_max if static_max is not None else static_length
        self.static_mask: torch.Tensor | None = None  # (rows padded, static_length)
        self.extra = 0  # the padding rows of a static batch
        self.compiled = compiled
        self.forward_step = (
            functools.partial(compiled_step(backbone), backbone) if compiled else backbone
        )

    def prefill(self) -> torch.Tensor:
        """Run the prompts; ``(r, d)`` hidden states at their last positions."""
        cache = None
        embeds, mask, positions = self.embeds, self.mask, self.positions
        if self.static_length is not None:
            r, width = self.mask.shape
            self.extra = bucket(r) - r
            cache = CACHE_POOL.take(self.backbone, r + self.extra, self.static_length)
            if not growable(cache):
                CACHE_POOL.give_back(self.backbone, r + self.extra, self.static_length, cache)
                self.static_length = self.static_max
                cache = CACHE_POOL.take(self.backbone, r + self.extra, self.static_length)
            embeds, mask, positions = (self._pad(x) for x in (embeds, mask, positions))
            self.static_mask = mask.new_zeros(r + self.extra, self.static_length)
            self.static_mask[:, :width] = mask
        out = self.backbone(
            embeds,
            attention_mask=mask,
            position_ids=positions,
            cache=cache,
            use_cache=self.use_cache,
        )
        self.cache = cache if cache is not None else out.cache
        return out.hidden_states[: len(self.mask), -1]

    def _grow(self) -> None:
        """A static cache (and mask) of twice the length holding this one's positions."""
        assert self.static_mask is not None
        length = min(2 * self.static_length, self.static_max)
        if length <= self.static_length:
            raise RuntimeError("a static batch outgrew the longest it could reach")
        rows = len(self.static_mask)
        cache = CACHE_POOL.take(self.backbone, rows, length)
        for new, old in zip(cache.layers, self.cache.layers, strict=True):
            if not new.is_initialized:
                new.lazy_initialization(old.keys, old.values)
            new.keys[:, :, : self.static_length].copy_(old.keys)
            new.values[:, :, : self.static_length].copy_(old.values)
            new.cumulative_length.copy_(old.cumulative_length)
        CACHE_POOL.give_back(self.backbone, rows, self.static_length, self.cache)
        mask = self.static_mask.new_zeros(rows, length)
        mask[:, : self.static_length] = self.static_mask
        self.cache, self.static_mask, self.static_length = cache, mask, length

    def release(self) -> None:
        """Hand a static cache back for the next batch of its shape."""
        if self.static_mask is not None and self.cache is not None:
            CACHE_POOL.give_back(
                self.backbone, len(self.static_mask), self.static_length, self.cache
            )
            self.cache = None

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` with the static batch's padding rows (copies of its last row)."""
        if not self.extra:
            return x
        return torch.cat([x, x[-1:].expand(self.extra, *x.shape[1:])])

    def step(self, embeds: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
        """Append one input per row (``(r, d)`` embeddings; rows not ``alive`` are masked)."""
        position = self.next_position[:, None]
        column = self.mask.shape[1]
        self.mask = torch.cat([self.mask, alive[:, None].to(self.mask.dtype)], dim=1)
        self.next_position = self.next_position + alive.long()
        if self.static_mask is not None:  # the cache keeps its object until it grows
            if column >= self.static_length:
                self._grow()
            self.static_mask[:, column] = self._pad(alive).to(self.static_mask.dtype)
            out = self.forward_step(
                self._pad(embeds)[:, None],
                attention_mask=self.static_mask,
                position_ids=self._pad(position),
                cache=self.cache,
                use_cache=True,
            )
            hidden = out.hidden_states[: len(self.mask), -1]
            # a CUDA graph's next replay overwrites its outputs
            return hidden.clone() if self.compiled else hidden
        if self.use_cache:
            out = self.backbone(
                embeds[:, None],
                attention_mask=self.mask,
                position_ids=position,
                cache=self.cache,
                use_cache=True,
            )
            self.cache = out.cache
        else:
            self.embeds = torch.cat([self.embeds, embeds[:, None]], dim=1)
            self.positions = torch.cat([self.positions, position], dim=1)
            out = self.backbone(self.embeds, attention_mask=self.mask, position_ids=self.positions)
        return out.hidden_states[:, -1]

    def resizable(self) -> bool:
        """Whether rows can be added and dropped: the whole-sequence path, or a cache whose
        every layer is transformers' plain growing key/value store (not a sliding window, a
        quantised or a static cache)."""
        return not self.use_cache or every_layer(self.cache, "DynamicLayer")

    def merge(self, other: Rows, order: torch.Tensor) -> None:
        """Add ``other``'s prefilled rows: both left-padded to the longer sequence (padding
        masked), then every row put in ``order`` (indices into these rows, then other's)."""
        la, lb = self.mask.shape[1], other.mask.shape[1]
        width = max(la, lb)

        def both(a: torch.Tensor, b: torch.Tensor, dim: int) -> torch.Tensor:
            return torch.cat([_left_pad(a, dim, width - la), _left_pad(b, dim, width - lb)])[order]

        self.mask = both(self.mask, other.mask, 1)
        self.next_position = torch.cat([self.next_position, other.next_position])[order]
        if self.use_cache:
            for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
                mine.keys = both(mine.keys, theirs.keys, 2)
                mine.values = both(mine.values, theirs.values, 2)
        else:
            self.embeds = both(self.embeds, other.embeds, 1)
            self.positions = both(self.positions, other.positions, 1)

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` (indices, in their new order), and drop the leading columns that
        none of them attends to."""
        self.mask, self.next_position = self.mask[rows], self.next_position[rows]
        first = int(self.mask.any(dim=0).long().argmax())
        self.mask = self.mask[:, first:]
        if self.use_cache:
            for layer in self.cache.layers:
                layer.keys = layer.keys[rows, :, first:]
                layer.values = layer.values[rows, :, first:]
        else:
            self.embeds = self.embeds[rows, first:]
            self.positions = self.positions[rows, first:]


def _left_pad(x: torch.Tensor, dim: int, n: int) -> torch.Tensor:
    if n == 0:
        return x
    shape = list(x.shape)
    shape[dim] = n
    return torch.cat([x.new_zeros(shape), x], dim=dim)
