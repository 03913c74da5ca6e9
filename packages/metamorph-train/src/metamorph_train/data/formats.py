"""The source formats and the stream each opens: the one place that knows them all
(:mod:`metamorph_train.data.sources` holds what the formats share)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

FORMATS = ("jsonl", "webdataset", "parquet", "hf")


def open_stream(
    format: str,
    path: str | Path,
    check: Callable[[Any, str], dict[str, Any]],
    on_error: str = "raise",
    seed: int = 0,
    counts: dict[str, int] | None = None,
) -> Any:
    """The stream of a source of ``format`` (one of :data:`FORMATS`)."""
    if format == "jsonl":
        from metamorph_train.data.stream import ShardedJsonl

        return ShardedJsonl(path, check, on_error, seed, counts)
    if format == "webdataset":
        from metamorph_train.data.webdataset_source import WebDatasetStream

        return WebDatasetStream(path, check, on_error, seed, counts)
    if format == "parquet":
        from metamorph_train.data.parquet_source import ParquetStream

        return ParquetStream(path, check, on_error, seed, counts)
    if format == "hf":
        from metamorph_train.data.hf_source import HFStream

        return HFStream(path, check, on_error, seed, counts)
    raise ValueError(
        f"data source '{path}': unknown format '{format}'; use one of {', '.join(FORMATS)}"
    )
