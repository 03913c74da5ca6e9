"""Datasets of records with their images loaded: conversations (VPiT), images (decoder
training), image-caption pairs (encoder pretraining) and text (language-model pretraining).

Each reads a JSON/JSONL file into memory (map-style: ``len`` and ``dataset[i]``), or, with
``streaming=True``, streams sharded JSONL (:class:`~metamorph_train.data.stream.ShardedJsonl`:
``next()``, ``state_dict()``). ``format="webdataset" | "parquet" | "hf"`` always streams those
sources (:mod:`metamorph_train.data.sources`); their images come inside the records as
:class:`~metamorph_train.data.sources.ImageBytes` and are decoded from the bytes, while a plain
string names a file under ``image_root``. A bad record or unreadable image raises naming the
file (or shard) and record, or with ``on_error="skip"`` yields ``None`` and is counted in
``errors``.

An item is made in two steps: :meth:`RecordDataset.describe` (cheap, no image read: where the
draw happens, in the loader's main process) and :meth:`RecordDataset.materialise` (images read
or taken from the feature cache: in the loader's worker processes,
:mod:`metamorph_train.data.loader`); ``dataset[i]`` and ``next()`` do both.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from metamorph_core.conversation import Conversation
from metamorph_train.data.formats import FORMATS, open_stream
from metamorph_train.data.images import ImageMemory, ImageRoot
from metamorph_train.data.records import (
    check_image_record,
    check_pair_record,
    check_record,
    check_text_record,
    read_records,
    record_text,
)
from metamorph_train.data.sources import ImageBytes

# what bad input raises while an item is made (a missing or undecodable image, a malformed
# record): skipped and counted with on_error="skip"
SKIPPABLE = (OSError, ValueError, KeyError)


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
        format: str = "jsonl",
        image_memory: ImageMemory | None = None,
    ) -> None:
        """``feature_cache`` (a :class:`metamorph_train.cache.FeatureCache`): images come as
        their cached tokens (looked up by the images' names) and are not read. ``format``: one
        of :data:`~metamorph_train.data.formats.FORMATS`; all but ``jsonl`` stream whatever
        ``streaming`` says. ``image_memory``: image files under ``image_root`` are kept there
        once decoded (it may be shared by several datasets)."""
        if format not in FORMATS:
            raise ValueError(
                f"data source '{path}': unknown format '{format}'; use one of {', '.join(FORMATS)}"
            )
        self.errors = ErrorCounts()
        self.format = format
        self.streaming = streaming or format != "jsonl"
        if self.streaming:
            self.stream = open_stream(format, path, self.check, on_error, seed, self.errors.counts)
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
        self.image_memory = image_memory

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

    def describe_at(self, index: int) -> Any:
        """``self[index]`` as :meth:`describe` gives it (images unread; ``None``: skipped and
        counted): what the loader's main process draws."""
        return self.or_skip(self.describe, self.records[index])

    def next_described(self) -> Any:
        """:meth:`next` as :meth:`describe` gives it (images unread)."""
        record = self.stream.next()
        return None if record is None else self.or_skip(self.describe, record)

    def state_dict(self) -> dict[str, Any]:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state)

    def __getstate__(self) -> dict[str, Any]:
        # what a loader worker needs to materialise items (image root, feature cache, error
        # policy); the records and the stream stay with the main process, which draws
        return {k: v for k, v in self.__dict__.items() if k not in ("records", "stream")}

    def _item_or_skip(self, record: dict[str, Any]) -> Any:
        return self.or_skip(self.item, record)

    def or_skip(self, make: Callable[[Any], Any], value: Any) -> Any:
        """``make(value)``, or with ``on_error="skip"`` ``None`` (counted) where it fails on
        bad input."""
        try:
            return make(value)
        except SKIPPABLE:
            if self.on_error == "raise":
                raise
            self.errors.add("bad_images")
            return None

    def item(self, record: dict[str, Any]) -> Any:
        """The record's training item, images read (``None``: nothing to train on)."""
        described = self.describe(record)
        return None if described is None else self.materialise(described)

    def describe(self, record: dict[str, Any]) -> Any:
        """The record as far as it goes without reading an image (``None``: nothing to train
        on); by default the record itself."""
        return record

    def materialise(self, described: Any) -> Any:
        """A :meth:`describe` result with its images read: the training item."""
        raise NotImplementedError

    def images(self, record: dict[str, Any]) -> list[Any]:
        """The record's images: ``(3, h, w)`` tensors in [0, 1], or cached features."""
        paths = record.get("image", [])
        paths = [paths] if isinstance(paths, str) else paths
        return self.load_images(paths, record.get("id"))

    def load_images(self, images: list[Any], record_id: Any = None) -> list[Any]:
        """Images named by a record (names or carried bytes) read, or their cached features."""
        if self.feature_cache is not None:
            return [self.feature_cache.get(p) for p in images]
        return [self.load_image(p, record_id) for p in images]

    def load_image(self, image: str, record_id: Any = None) -> Any:
        """One image of a record as ``(3, h, w)`` in [0, 1]: bytes the record carries
        (:class:`~metamorph_train.data.sources.ImageBytes`) decoded, or a file under
        ``image_root``."""
        if isinstance(image, ImageBytes):
            return image.to_tensor(record_id)
        if self.root is None:
            raise ValueError(f"record {record_id!r} names image '{image}' but no image_root is set")
        if self.image_memory is not None:
            return self.image_memory.load(self.root, image, record_id)
        return self.root.load(image, record_id)


class ConversationDataset(RecordDataset):
    """LLaVA-style records as :class:`Conversation` objects (VPiT training); described, a
    conversation holds its images' names (or carried bytes) where the images will be."""

    def describe(self, record: dict[str, Any]) -> Conversation:
        return Conversation.from_llava(record)

    def materialise(self, described: Conversation) -> Conversation:
        return replace(described, images=self.load_images(described.images, described.id))


@dataclass
class ImageItem:
    """One record's images for decoder training: ``pixels`` ``(3, h, w)`` in [0, 1] each, and
    their cached encoder tokens when a feature cache is given. The loader's workers may add
    ``encoder_pixels``, the images through the encoder's ``preprocess``."""

    pixels: list[Any]
    tokens: list[Any] | None = None
    encoder_pixels: list[Any] | None = None


class ImageDataset(RecordDataset):
    """The images of any records (conversations or pairs) for decoder training; records
    without images are left out (streamed ones come as ``None``, counted as skipped). With a feature cache, the tokens come from it and the pixels
    are still read (they are the decoder's targets)."""

    check = staticmethod(check_image_record)

    def keep(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [r for r in records if r.get("image")]

    def describe(self, record: dict[str, Any]) -> dict[str, Any] | None:
        paths = record.get("image", [])
        paths = [paths] if isinstance(paths, str) else paths
        if not paths:  # streamed records are not filtered ahead: counted as skipped
            return None
        if self.root is None and not all(isinstance(p, ImageBytes) for p in paths):
            raise ValueError("decoder training reads pixels: set the source's image_root")
        return record

    def materialise(self, described: dict[str, Any]) -> ImageItem:
        paths = described["image"]
        paths = [paths] if isinstance(paths, str) else paths
        pixels = [self.load_image(p, described.get("id")) for p in paths]
        tokens = None
        if self.feature_cache is not None:
            tokens = [self.feature_cache.get(p).tokens for p in paths]
        return ImageItem(pixels, tokens)


class PairDataset(RecordDataset):
    """``{"image", "caption"}`` records as ``(image (3, h, w) in [0, 1], caption)``
    (encoder pretraining)."""

    check = staticmethod(check_pair_record)

    def materialise(self, described: dict[str, Any]) -> tuple[Any, str]:
        return self.images(described)[0], described["caption"]


class TextDataset(RecordDataset):
    """``{"text"}`` records, or conversations without images (turns joined by newlines), as
    strings (language-model pretraining)."""

    check = staticmethod(check_text_record)

    def describe(self, record: dict[str, Any]) -> str:
        return record_text(record)

    def materialise(self, described: str) -> str:
        return described
