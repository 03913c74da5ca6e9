"""Datasets of records with their images loaded: conversations (VPiT), images (decoder
training), image-caption pairs (encoder pretraining) and text (language-model pretraining).

Each reads a JSON/JSONL file into memory (map-style: ``len`` and ``dataset[i]``), or, with
``streaming=True``, streams sharded JSONL (:class:`~metamorph_train.data.stream.ShardedJsonl`:
``next()``, ``state_dict()``). A bad record or unreadable image raises naming the file and
record, or with ``on_error="skip"`` yields ``None`` and is counted in ``errors``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from metamorph_core.conversation import Conversation
from metamorph_train.data.images import ImageRoot
from metamorph_train.data.records import (
    check_image_record,
    check_pair_record,
    check_record,
    check_text_record,
    read_records,
    record_text,
)
from metamorph_train.data.stream import ShardedJsonl


@dataclass
class ErrorCounts:
    """What ``on_error="skip"`` skipped, for the run summary."""

    counts: Counter = field(default_factory=Counter)

    def add(self, kind: str) -> None:
        self.counts[kind] += 1

    def summary(self) -> dict[str, int]:
        return dict(self.counts)


class RecordDataset:
    """Records of one source turned into training items by :meth:`item`."""

    check: Callable[[Any, str], dict[str, Any]] = staticmethod(check_record)

    def __init__(
        self,
        path: str | Path,
        image_root: str | Path | None = None,
        on_error: str = "raise",
        feature_cache: Any = None,
        streaming: bool = False,
        seed: int = 0,
    ) -> None:
        """``feature_cache`` (a :class:`metamorph_train.cache.FeatureCache`): images come as
        their cached tokens and are not read."""
        self.errors = ErrorCounts()
        self.streaming = streaming
        if streaming:
            self.stream = ShardedJsonl(path, self.check, on_error, seed, self.errors.counts)
        else:
            counts: dict[str, int] = {}
            self.records = self.keep(read_records(path, on_error, counts, self.check))
            for _ in range(counts.get("bad_records", 0)):
                self.errors.add("bad_records")
            if not self.records:
                raise ValueError(f"data file '{path}' holds no usable records")
        self.root = ImageRoot(image_root) if image_root is not None else None
        self.on_error = on_error
        self.feature_cache = feature_cache

    def keep(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The records this dataset uses (all, unless a subclass filters)."""
        return records

    def __len__(self) -> int:
        if self.streaming:
            raise TypeError("a streaming dataset has no length; draw from it with next()")
        return len(self.records)

    def __getitem__(self, index: int) -> Any:
        return self._item_or_skip(self.records[index])

    def next(self) -> Any:
        """The next item of a streaming dataset (``None``: skipped and counted)."""
        record = self.stream.next()
        return None if record is None else self._item_or_skip(record)

    def state_dict(self) -> dict[str, Any]:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state)

    def _item_or_skip(self, record: dict[str, Any]) -> Any:
        try:
            return self.item(record)
        except (OSError, ValueError, KeyError):
            if self.on_error == "raise":
                raise
            self.errors.add("bad_images")
            return None

    def item(self, record: dict[str, Any]) -> Any:
        raise NotImplementedError

    def images(self, record: dict[str, Any]) -> list[Any]:
        """The record's images: ``(3, h, w)`` tensors in [0, 1], or cached features."""
        paths = record.get("image", [])
        paths = [paths] if isinstance(paths, str) else paths
        if self.feature_cache is not None:
            return [self.feature_cache.get(p) for p in paths]
        if paths and self.root is None:
            raise ValueError(f"record {record.get('id')!r} names images but no image_root is set")
        return [self.root.load(p, record.get("id")) for p in paths]  # type: ignore[union-attr]


class ConversationDataset(RecordDataset):
    """LLaVA-style records as :class:`Conversation` objects (VPiT training)."""

    def item(self, record: dict[str, Any]) -> Conversation:
        return Conversation.from_llava(record, images=self.images(record))


@dataclass
class ImageItem:
    """One record's images for decoder training: ``pixels`` ``(3, h, w)`` in [0, 1] each, and
    their cached encoder tokens when a feature cache is given."""

    pixels: list[Any]
    tokens: list[Any] | None = None


class ImageDataset(RecordDataset):
    """The images of any records (conversations or pairs) for decoder training; records
    without images are left out (streamed ones come as ``None``, counted as skipped). With a feature cache, the tokens come from it and the pixels
    are still read (they are the decoder's targets)."""

    check = staticmethod(check_image_record)

    def keep(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [r for r in records if r.get("image")]

    def item(self, record: dict[str, Any]) -> ImageItem | None:
        paths = record.get("image", [])
        paths = [paths] if isinstance(paths, str) else paths
        if not paths:  # streamed records are not filtered ahead: counted as skipped
            return None
        if self.root is None:
            raise ValueError("decoder training reads pixels: set the source's image_root")
        pixels = [self.root.load(p, record.get("id")) for p in paths]
        tokens = None
        if self.feature_cache is not None:
            tokens = [self.feature_cache.get(p).tokens for p in paths]
        return ImageItem(pixels, tokens)


class PairDataset(RecordDataset):
    """``{"image", "caption"}`` records as ``(image (3, h, w) in [0, 1], caption)``
    (encoder pretraining)."""

    check = staticmethod(check_pair_record)

    def item(self, record: dict[str, Any]) -> tuple[Any, str]:
        return self.images(record)[0], record["caption"]


class TextDataset(RecordDataset):
    """``{"text"}`` records, or conversations without images (turns joined by newlines), as
    strings (language-model pretraining)."""

    check = staticmethod(check_text_record)

    def item(self, record: dict[str, Any]) -> str:
        return record_text(record)
