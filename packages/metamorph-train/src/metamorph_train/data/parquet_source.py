"""Parquet files as a streaming source (``format: parquet``; needs pyarrow).

Layout. A source names ``.parquet`` files by a directory, a glob or a brace pattern. Each row
is one record: every column becomes a record key (null values are left out), read as follows.

- ``conversations``: a JSON string, or a list of ``{from, value}`` structs (null fields left
  out).
- ``image``: one image or a list of them; an image is binary (its encoded file), a string (a
  path relative to the source's ``image_root``), or a ``{bytes, path}`` struct (the storage of
  Hugging Face's ``Image`` feature): bytes when present, else the path. A single image gives a
  string ``image`` (pairs need one), a list a list.
- ``image_names`` (optional, same shape as ``image``): the names the images are given
  (``metamorph data convert`` keeps the original paths there for ``hf``); not a record key.
- ``id``, ``caption``, ``text`` and any other column: as they are.

Images carried as bytes come as :class:`~.sources.ImageBytes` named by ``image_names``, the
struct's ``path``, or ``image <i>``; the dataset decodes them, and an undecodable one raises
naming the file and row (or is counted as ``bad_images``).

State: ``position = [epoch, k, row]``: the ``k``-th file of the epoch's order and the next row
in it. Files are read by row group in batches of 64 rows, never whole. A row whose
``conversations`` or ``image`` cannot be read is a bad record naming the file and row; a file
that cannot be opened or read on raises naming it and the row (``bad_shards`` when skipped).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from metamorph_core.errors import ConversationError
from metamorph_train.data.sources import (
    FileShardStream,
    ImageBytes,
    ShardError,
    bad_record,
)

BATCH_ROWS = 64


def _no_none(value: Any) -> Any:
    return {k: v for k, v in value.items() if v is not None} if isinstance(value, dict) else value


def _images(value: Any, names: Any, where: str) -> Any:
    single = not isinstance(value, list)
    items = [value] if single else value
    listed = [names] if isinstance(names, str) else names
    if listed is not None and (not isinstance(listed, list) or len(listed) != len(items)):
        raise bad_record(where, f"'image_names' {names!r} does not match the {len(items)} images")
    out: list[str] = []
    for i, v in enumerate(items):
        name = listed[i] if listed is not None else None
        data = path = None
        if isinstance(v, dict) and ("bytes" in v or "path" in v):
            data, path = v.get("bytes"), v.get("path")
        elif isinstance(v, (bytes, bytearray)):
            data = v
        elif isinstance(v, str):
            path = v
        if data is not None:
            out.append(ImageBytes(name or path or f"image {i}", data, where))
        elif isinstance(path, str):
            out.append(name or path)
        else:
            raise bad_record(
                where,
                f"image {i} is {type(v).__name__} {str(v)[:40]!r}; an image is binary, a path "
                "or a {bytes, path} struct",
            )
    return out[0] if single else out


def row_record(row: dict[str, Any], where: str) -> dict[str, Any] | Exception:
    """The record of one table row (see the module for the columns), or the error of a bad
    one (shared by the ``hf`` source)."""
    record = {k: v for k, v in row.items() if v is not None}
    names = record.pop("image_names", None)
    turns = record.get("conversations")
    if isinstance(turns, str):
        try:
            record["conversations"] = json.loads(turns)
        except json.JSONDecodeError as e:
            return bad_record(
                where, f"column 'conversations' is not valid JSON: {e.msg} (column {e.colno})"
            )
    elif isinstance(turns, list):
        record["conversations"] = [_no_none(t) for t in turns]
    if "image" in record:
        try:
            record["image"] = _images(record["image"], names, where)
        except ConversationError as e:
            return e
    return record


class _Rows:
    """Rows of one parquet file from a given row on, a batch at a time."""

    def __init__(self, path: Path, row: int) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.path, self.row = path, row
        self.file: IO[bytes] = open(path, "rb")  # noqa: SIM115 - closed by close()
        self.buffer: list[dict[str, Any]] = []
        self.batches: Iterator[Any] = iter(())
        try:
            pf = pq.ParquetFile(self.file)
            start = 0
            for g in range(pf.num_row_groups):
                n = pf.metadata.row_group(g).num_rows
                if row < start + n:
                    groups = list(range(g, pf.num_row_groups))
                    self.batches = pf.iter_batches(BATCH_ROWS, row_groups=groups, use_threads=False)
                    self.skip = row - start
                    return
                start += n
            self.skip = 0
        except (pa.ArrowException, OSError) as e:
            self.close()
            raise self._damaged(e) from e

    def _damaged(self, why: object) -> ShardError:
        return ShardError(
            f"{self.path}: cannot read row {self.row} of the parquet file: {why}; the rows "
            "before it were read. Re-create the file (metamorph data convert), or set "
            "data.on_error: skip to skip the rest of it"
        )

    def close(self) -> None:
        self.file.close()

    def next(self) -> dict[str, Any] | None:
        import pyarrow as pa

        try:
            while not self.buffer:
                batch = next(self.batches, None)
                if batch is None:
                    return None
                rows = batch.to_pylist()
                cut = min(self.skip, len(rows))
                self.skip -= cut
                self.buffer = rows[cut:][::-1]
        except (pa.ArrowException, OSError) as e:
            raise self._damaged(e) from e
        self.row += 1
        return self.buffer.pop()


class ParquetStream(FileShardStream):
    """An endless, resumable stream of records from parquet files (the module gives the
    columns and the state)."""

    format = "parquet"
    suffixes = (".parquet",)

    def _read(self, epoch: int, shard: int, within: list[int]) -> tuple[Any, str, list[int]] | None:
        row = within[0]
        if self._open is None or self._open[0] != shard or self._open[1].row != row:
            self._close()
            self._open = (shard, _Rows(self.shards[shard], row))
        got = self._open[1].next()
        if got is None:
            self._close()
            return None
        where = f"{self.shards[shard]} row {row}"
        return row_record(got, where), where, [row + 1]
