"""Streaming sources of every format, read as records of one schema.

A recipe source names its ``format`` (:data:`~metamorph_train.data.formats.FORMATS`):
``jsonl`` (:mod:`.stream`), ``webdataset`` (:mod:`.webdataset_source`), ``parquet``
(:mod:`.parquet_source`) or ``hf`` (:mod:`.hf_source`). Every stream yields records of the JSONL schema (:mod:`.records`: LLaVA
conversations ``{"id", "image", "conversations"}``, pairs ``{"image", "caption"}``, text
``{"text"}``), validated by the dataset's ``check``, so :class:`~.dataset.RecordDataset` turns
them into items unchanged. An image stored inside a shard comes as :class:`ImageBytes`: a
``str`` (its name, e.g. the record's original path, so checks, comparisons and feature-cache
look-ups see a path) that also carries the encoded bytes; the dataset decodes it with PIL
instead of reading a file under ``image_root``.

The contract every stream keeps (:class:`ShardStream` for the new formats, and
:class:`~.stream.ShardedJsonl`):

- ``next()`` returns the next validated record, or ``None`` for a bad one with
  ``on_error="skip"`` (counted in ``counts``: ``bad_records`` for a record, ``bad_shards`` for a
  shard that cannot be read on, whose remaining records are skipped; what was read before the
  damage is kept). With ``on_error="raise"`` the error names the shard and the position in it.
- It is endless: every epoch reads all shards in an order drawn from ``seed`` and the epoch. A
  whole epoch without one usable record is an error.
- ``state_dict()`` is JSON-serialisable; ``load_state_dict`` on a fresh stream of the same
  source continues with exactly the next record.
"""

from __future__ import annotations

import glob
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from metamorph_core.errors import ConversationError

_MOD = 2**63


class ImageBytes(str):
    """An image carried by a record: the string is its name; ``data`` the encoded file (PNG,
    JPEG, ...); ``where`` the shard and position it came from (for errors)."""

    data: bytes
    where: str

    def __new__(cls, name: str, data: bytes, where: str = "") -> ImageBytes:
        obj = super().__new__(cls, name)
        obj.data, obj.where = bytes(data), where
        return obj

    def __reduce__(self) -> tuple[Any, ...]:
        return (ImageBytes, (str(self), self.data, self.where))

    def to_tensor(self, record_id: Any = None) -> Any:
        """``(3, h, w)`` float in [0, 1]; an undecodable image raises ``ValueError`` naming
        ``where``, the record and the image."""
        from PIL import Image

        from metamorph_core.vision import to_tensor

        try:
            with Image.open(io.BytesIO(self.data)) as img:
                img.load()
                return to_tensor(img)
        except Exception as e:  # noqa: BLE001 - PIL raises many kinds for broken files
            raise ValueError(
                f"{self.where}: record {record_id!r}: image '{self}' ({len(self.data)} bytes) "
                f"cannot be decoded: {e}; re-encode it (PNG, JPEG), drop the record, or set "
                "data.on_error: skip"
            ) from e


class ShardError(ValueError):
    """A shard cannot be read from some position on (truncated or corrupt)."""


def seeded(*parts: int) -> int:
    """A generator seed from integers (``seeded(seed, epoch) == seed * 1_000_003 + epoch``, the
    shard order of :class:`~.stream.ShardedJsonl`)."""
    x = 0
    for p in parts:
        x = (x * 1_000_003 + p) % _MOD
    return x


def permutation(n: int, *parts: int) -> list[int]:
    """A permutation of ``range(n)`` drawn from a generator seeded by ``parts``."""
    import torch

    g = torch.Generator().manual_seed(seeded(*parts))
    return torch.randperm(n, generator=g).tolist()


def _expand(pattern: str) -> list[str]:
    if "{" not in pattern:
        return [pattern]
    try:
        from braceexpand import braceexpand
    except ImportError as e:
        raise ImportError(
            f"the shard pattern '{pattern}' uses braces, which need braceexpand: pip install "
            "braceexpand (it comes with metamorph-train[webdataset])"
        ) from e
    return list(braceexpand(pattern))


def list_files(pattern: str | Path, suffixes: tuple[str, ...], kind: str) -> list[Path]:
    """The files a source names: a directory (its files ending in ``suffixes``, sorted), a
    file, a glob (``data/part-*.parquet``, sorted) or a brace pattern
    (``data/shard-{000000..000099}.tar``, in its order; every file it names must exist)."""
    text = str(pattern)
    path = Path(text)
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(suffixes))
    elif path.is_file():
        found = [path]
    else:
        found = []
        for part in _expand(text):
            if any(c in part for c in "*?["):
                found += sorted(Path(p) for p in glob.glob(part) if Path(p).is_file())
            elif Path(part).is_file():
                found.append(Path(part))
            elif part != text:
                raise FileNotFoundError(
                    f"{kind} source '{text}' names '{part}', which does not exist; fix the "
                    "pattern's range or restore the file"
                )
        found = list(dict.fromkeys(found))
    if not found:
        raise FileNotFoundError(
            f"{kind} source '{text}' names no {'/'.join(suffixes)} files (give a directory, a "
            f"glob such as 'data/part-*{suffixes[0]}', a brace pattern such as "
            f"'data/shard-{{000000..000009}}{suffixes[0]}', or a file)"
        )
    bad = [p for p in found if not p.name.endswith(suffixes)]
    if bad:
        raise ValueError(
            f"{kind} source '{text}': '{bad[0]}' does not end in {' or '.join(suffixes)}"
        )
    return found


class ShardStream:
    """The stream contract (see the module) over numbered shards; a format implements
    :meth:`_read` (and :meth:`_start`, :meth:`_close`, :meth:`_identity`).

    ``position`` is ``[epoch, k, *within]``: ``k`` indexes the epoch's shard order and
    ``within`` (the format's) locates the next record in that shard.
    """

    format: ClassVar[str] = ""
    _transient: ClassVar[tuple[str, ...]] = ()  # open handles, dropped when pickled

    def __init__(
        self,
        pattern: str | Path,
        check: Callable[[Any, str], dict[str, Any]],
        on_error: str,
        seed: int,
        counts: dict[str, int] | None,
        num_shards: int,
    ) -> None:
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got '{on_error}'")
        self.pattern, self.check, self.on_error, self.seed = str(pattern), check, on_error, seed
        self.counts = counts if counts is not None else {}
        self.num_shards = num_shards
        self.position: list[int] = [0, 0, *self._start()]
        self._usable_this_epoch = False
        self._orders: tuple[int, list[int]] | None = None

    # -- what a format implements ------------------------------------------------------------
    def _start(self) -> list[int]:
        """``within`` at the start of a shard."""
        return [0]

    def _read(self, epoch: int, shard: int, within: list[int]) -> tuple[Any, str, list[int]] | None:
        """The next raw record of ``shard`` at ``within``: ``(record or ConversationError,
        where, within after it)``, or ``None`` at the shard's end; :class:`ShardError` when the
        shard cannot be read on."""
        raise NotImplementedError

    def _close(self) -> None:
        """Close what :meth:`_read` holds open."""

    def _identity(self) -> dict[str, Any]:
        """What must not change between a saved state and a resumed stream."""
        raise NotImplementedError

    # -- the contract -------------------------------------------------------------------------
    def _order(self, epoch: int) -> list[int]:
        if self._orders is None or self._orders[0] != epoch:
            self._orders = (epoch, permutation(self.num_shards, self.seed, epoch))
        return self._orders[1]

    def next(self) -> dict[str, Any] | None:
        """The next validated record; ``None`` for a bad one skipped with ``on_error="skip"``."""
        while True:
            epoch, k, *within = self.position
            if k >= self.num_shards:  # the epoch is over
                if not self._usable_this_epoch:
                    raise ValueError(
                        f"streaming source '{self.pattern}' ({self.format}) holds no usable records"
                    )
                self.position = [epoch + 1, 0, *self._start()]
                self._usable_this_epoch = False
                continue
            try:
                got = self._read(epoch, self._order(epoch)[k], within)
            except ShardError as e:
                self._close()
                self.position = [epoch, k + 1, *self._start()]
                return self._bad("bad_shards", e)
            if got is None:
                self.position = [epoch, k + 1, *self._start()]
                continue
            raw, where, after = got
            self.position = [epoch, k, *after]
            try:
                if isinstance(raw, Exception):
                    raise raw
                record = self.check(raw, where)
            except ConversationError as e:
                return self._bad("bad_records", e)
            self._usable_this_epoch = True
            return record

    def _bad(self, kind: str, error: Exception) -> None:
        if self.on_error == "raise":
            raise error
        self.counts[kind] = self.counts.get(kind, 0) + 1
        return None

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "pattern": self.pattern,
            **self._identity(),
            "position": list(self.position),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format", self.format) != self.format:
            raise ValueError(
                f"stream state is for a '{state['format']}' source, but '{self.pattern}' is "
                f"read as '{self.format}'; resume with the source's original format"
            )
        mine = self._identity()
        for key, value in mine.items():
            if state.get(key) != value:
                theirs = state.get(key)
                raise ValueError(
                    f"stream state has {key} {_short(theirs)}, but '{self.pattern}' now has "
                    f"{_short(value)}; the data of a resumed run must not change"
                )
        self._close()
        self.position = [int(x) for x in state["position"]]
        self._usable_this_epoch = True

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        for name in self._transient:
            state[name] = None
        return state


class FileShardStream(ShardStream):
    """A :class:`ShardStream` over files of the format's ``suffixes`` (a directory, a glob or
    a brace pattern), one shard a file, one held open at a time in ``_open``."""

    suffixes: ClassVar[tuple[str, ...]] = ()
    _transient = ("_open",)

    def __init__(
        self,
        pattern: str | Path,
        check: Callable[[Any, str], dict[str, Any]],
        on_error: str = "raise",
        seed: int = 0,
        counts: dict[str, int] | None = None,
    ) -> None:
        self.shards = list_files(pattern, self.suffixes, self.format)
        self._open: Any = None  # (shard number, the format's reader)
        super().__init__(pattern, check, on_error, seed, counts, len(self.shards))

    def _identity(self) -> dict[str, Any]:
        return {"shards": [p.name for p in self.shards]}

    def _close(self) -> None:
        if self._open is not None:
            self._open[1].close()
            self._open = None


def _short(value: Any) -> str:
    return f"{value[:3]}..." if isinstance(value, list) and len(value) > 3 else repr(value)


def bad_record(where: str, message: str) -> ConversationError:
    """The error of a bad record at ``where`` (returned by a stream's ``_read``)."""
    return ConversationError(f"{where}: {message}")
