"""A map-style dataset of conversations with their images loaded."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from metamorph_core.conversation import Conversation
from metamorph_train.data.images import ImageRoot
from metamorph_train.data.records import read_records


@dataclass
class ErrorCounts:
    """What ``on_error="skip"`` skipped, for the run summary."""

    counts: Counter = field(default_factory=Counter)

    def add(self, kind: str) -> None:
        self.counts[kind] += 1

    def summary(self) -> dict[str, int]:
        return dict(self.counts)


class ConversationDataset:
    """Records of a JSON/JSONL file as :class:`Conversation` objects, images read from
    ``image_root``. With ``on_error="skip"`` a bad record or an unreadable image makes
    ``dataset[i]`` return ``None`` (drop it in the collate function) and is counted in
    ``errors``; by default it raises naming the file and the record."""

    def __init__(
        self,
        path: str | Path,
        image_root: str | Path,
        on_error: str = "raise",
        feature_cache: Any = None,
    ) -> None:
        """``feature_cache`` (a :class:`metamorph_train.cache.FeatureCache`): images come as
        their cached tokens and are not read."""
        self.errors = ErrorCounts()
        counts: dict[str, int] = {}
        self.records = read_records(path, on_error, counts)
        for _ in range(counts.get("bad_records", 0)):
            self.errors.add("bad_records")
        if not self.records:
            raise ValueError(f"data file '{path}' holds no usable records")
        self.root = ImageRoot(image_root)
        self.on_error = on_error
        self.feature_cache = feature_cache

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Conversation | None:
        record = self.records[index]
        paths = record.get("image", [])
        paths = [paths] if isinstance(paths, str) else paths
        try:
            if self.feature_cache is not None:
                images = [self.feature_cache.get(p) for p in paths]
            else:
                images = [self.root.load(p, record.get("id")) for p in paths]
        except (OSError, ValueError, KeyError) as e:
            if self.on_error == "raise":
                raise
            self.errors.add("bad_images")
            del e
            return None
        return Conversation.from_llava(record, images=images)
