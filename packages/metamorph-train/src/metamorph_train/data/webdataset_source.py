"""webdataset tar shards as a streaming source (``format: webdataset``).

Layout. A source names uncompressed ``.tar`` shards by a brace pattern
(``data/shard-{000000..000099}.tar``), a directory (every ``*.tar`` in it) or a glob. A sample
is the run of consecutive members sharing a key: the member's path up to the first dot of its
file name (``train/000017.0.png`` has key ``train/000017`` and extension ``0.png``).

- ``KEY.json``: the record without its pixels, in the JSONL schema (a conversation, a pair or
  text); its ``image`` keeps the images' names (e.g. their original paths).
- ``KEY.<i>.<ext>`` (``KEY.0.png``, ``KEY.1.jpg``, ...): the ``i``-th image of the record's
  ``image`` list, ``i`` from 0. A record with one image may instead have one unindexed
  ``KEY.<ext>`` (``KEY.jpg``), ``ext`` an image extension (png, jpg, jpeg, webp, ...).
- No ``KEY.json`` (or one without ``image``): the sample's image members are the images, in
  index order, named by their member names (one unindexed image: ``image`` is a string).
- ``KEY.txt`` (optional): the ``caption`` of a sample with an image, else its ``text``, when
  the JSON gives neither (nor ``conversations``).

``metamorph data convert --to webdataset`` writes this layout. Images come as
:class:`~.sources.ImageBytes` named as in ``image``; the record gets no ``id`` it did not have.

State: ``position = [epoch, k, byte, sample]``: the ``k``-th shard of the epoch's order, the
byte offset of the next sample's first member header, and that sample's number in the shard.
Resuming seeks there. A truncated or corrupt shard raises naming the shard, the byte offset and
the sample; with ``on_error: skip`` the rest of the shard is skipped (``bad_shards``) and the
samples before the damage are kept. A sample whose JSON names an image the shard lacks is a bad
record (``bad_records``) naming the shard, sample and key.
"""

from __future__ import annotations

import json
import re
import tarfile
from pathlib import Path
from typing import IO, Any

from metamorph_train.data.sources import (
    FileShardStream,
    ImageBytes,
    ShardError,
    bad_record,
)

IMAGE_EXTS = frozenset({"png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff", "ppm"})
_INDEXED = re.compile(r"^(\d+)\.([A-Za-z0-9]+)$")
_BLOCK = 512


def split_name(name: str) -> tuple[str, str]:
    """A member name as ``(key, extension)``: the extension starts at the first dot of the
    file name."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext


class _TarSamples:
    """Samples of one shard read from a byte offset; ``offset`` is where the next unread
    sample starts (``sample()`` reads one member ahead to find a sample's end)."""

    def __init__(self, path: Path, offset: int) -> None:
        self.path, self.offset = path, offset
        self.file: IO[bytes] = open(path, "rb")  # noqa: SIM115 - closed by close()
        self.file.seek(offset)
        self.tar: tarfile.TarFile | None = None
        self.pending: tuple[int, str, bytes] | None = None
        self.ended = False

    def close(self) -> None:
        self.file.close()

    def _damaged(self, at: int, sample: int, why: object) -> ShardError:
        return ShardError(
            f"{self.path}: truncated or corrupt tar at byte {at} (sample {sample}): {why}; the "
            "samples before it were read. Re-create the shard (metamorph data convert), or set "
            "data.on_error: skip to skip the rest of it"
        )

    def _member(self, sample: int) -> tuple[int, str, bytes] | None:
        at = self.tar.offset if self.tar is not None else self.offset
        try:
            if self.tar is None:
                self.tar = tarfile.open(fileobj=self.file, mode="r:")  # noqa: SIM115
            while True:
                at = self.tar.offset
                member = self.tar.next()
                if member is None:
                    self._check_end(sample)
                    return None
                at = member.offset
                if not member.isfile():
                    continue
                data = self.tar.extractfile(member).read()  # type: ignore[union-attr]
                if len(data) != member.size:
                    raise tarfile.ReadError(
                        f"member '{member.name}' has {len(data)} of its {member.size} bytes"
                    )
                return member.offset, member.name, data
        except (tarfile.TarError, OSError, EOFError) as e:
            raise self._damaged(at, sample, e) from e

    def _check_end(self, sample: int) -> None:
        """tarfile stops quietly at a bad header after the first; the end must be the file's
        end or a zero block."""
        end = self.tar.offset  # type: ignore[union-attr]
        self.file.seek(end)
        block = self.file.read(_BLOCK)
        if block and block != bytes(_BLOCK):
            what = "a cut header" if len(block) < _BLOCK else "an invalid header"
            raise self._damaged(end, sample, f"{what} where the next member should start")
        self.offset = end

    def sample(self, sample: int) -> tuple[int, str, dict[str, bytes], list[str]] | None:
        """``(byte offset, key, {extension: bytes}, duplicated extensions)`` of the next sample,
        or ``None`` at the shard's end."""
        if self.ended:
            return None
        first = self.pending or self._member(sample)
        self.pending = None
        if first is None:
            self.ended = True
            return None
        start, name, data = first
        key, ext = split_name(name)
        files, dup = {ext: data}, []
        while True:
            member = self._member(sample)
            if member is None:
                self.ended = True
                break
            other, ext = split_name(member[1])
            if other != key:
                self.pending, self.offset = member, member[0]
                break
            if ext in files:
                dup.append(ext)
            files[ext] = member[2]
        return start, key, files, dup


def sample_record(
    key: str, files: dict[str, bytes], dup: list[str], where: str
) -> dict[str, Any] | Exception:
    """The record of one sample (see the module for the layout), or the error of a bad one."""
    if dup:
        return bad_record(where, f"sample '{key}' has several '{key}.{dup[0]}' members")
    record: dict[str, Any] = {}
    if "json" in files:
        try:
            record = json.loads(files["json"].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            return bad_record(where, f"'{key}.json' is not valid JSON: {e}")
        if not isinstance(record, dict):
            return bad_record(where, f"'{key}.json' must hold a JSON object (the record)")
    indexed: dict[int, tuple[str, bytes]] = {}
    single: list[tuple[str, bytes]] = []
    for ext, data in files.items():
        m = _INDEXED.match(ext)
        if m:
            indexed[int(m.group(1))] = (ext, data)
        elif ext.lower() in IMAGE_EXTS:
            single.append((ext, data))
    names = record.get("image")
    if names is None:
        if indexed:
            record["image"] = [
                ImageBytes(f"{key}.{indexed[i][0]}", indexed[i][1], where) for i in sorted(indexed)
            ]
        elif len(single) == 1:
            record["image"] = ImageBytes(f"{key}.{single[0][0]}", single[0][1], where)
        elif single:
            exts = sorted(e for e, _ in single)
            return bad_record(
                where,
                f"sample '{key}' has several unindexed images {exts}; name them "
                f"'{key}.0.<ext>', '{key}.1.<ext>', ... in the record's order",
            )
    elif isinstance(names, (str, list)) and all(isinstance(n, str) for n in names):
        listed = [names] if isinstance(names, str) else names
        images = []
        for i, name in enumerate(listed):
            member = indexed.get(i)
            if member is None and len(listed) == 1 and len(single) == 1:
                member = single[0]
            if member is None:
                return bad_record(
                    where,
                    f"sample '{key}' names image {i} '{name}' but the shard holds no "
                    f"'{key}.{i}.<ext>' member (members: {sorted(files)})",
                )
            images.append(ImageBytes(name, member[1], where))
        record["image"] = images[0] if isinstance(names, str) else images
    if "txt" in files and not any(k in record for k in ("caption", "text", "conversations")):
        text = files["txt"].decode("utf-8", errors="replace")
        record["caption" if record.get("image") else "text"] = text
    return record


class WebDatasetStream(FileShardStream):
    """An endless, resumable stream of records from webdataset tar shards (the module gives
    the layout and the state)."""

    format = "webdataset"
    suffixes = (".tar",)

    def _start(self) -> list[int]:
        return [0, 0]  # byte offset, sample number

    def _read(self, epoch: int, shard: int, within: list[int]) -> tuple[Any, str, list[int]] | None:
        offset, number = within
        if self._open is None or self._open[0] != shard or self._open[1].offset != offset:
            self._close()
            self._open = (shard, _TarSamples(self.shards[shard], offset))
        reader = self._open[1]
        got = reader.sample(number)
        if got is None:
            self._close()
            return None
        start, key, files, dup = got
        where = f"{self.shards[shard]}: sample {number} (key '{key}', byte {start})"
        return sample_record(key, files, dup, where), where, [reader.offset, number + 1]
