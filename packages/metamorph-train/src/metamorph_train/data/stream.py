"""Sharded JSONL sources that stream: records are read one at a time from many files, never
all held in memory, and the position (epoch, shard, byte offset) is saved and restored exactly.

A source names its shards by a directory (every ``*.jsonl`` in it), a glob pattern
(``data/part-*.jsonl``) or a single file. Every epoch reads all shards, in an order shuffled by
the seed and the epoch; records within a shard are read in file order.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

from metamorph_core.errors import ConversationError


def shard_paths(pattern: str | Path) -> list[Path]:
    """The shards a source names, sorted; an error when there are none."""
    path = Path(pattern)
    if path.is_dir():
        found = sorted(path.glob("*.jsonl"))
    elif path.is_file():
        found = [path]
    else:
        found = sorted(Path(p) for p in glob.glob(str(pattern)))
    found = [p for p in found if p.is_file()]
    if not found:
        raise FileNotFoundError(
            f"streaming source '{pattern}' names no .jsonl shards (give a directory of .jsonl "
            "files, a glob pattern such as 'data/part-*.jsonl', or a file)"
        )
    bad = [p for p in found if p.suffix != ".jsonl"]
    if bad:
        raise ValueError(f"streaming sources read JSONL shards only; '{bad[0]}' is not .jsonl")
    return found


class ShardedJsonl:
    """An endless stream of validated records from JSONL shards.

    ``next()`` returns the next record, or ``None`` for a malformed one when ``on_error="skip"``
    (counted in ``counts['bad_records']``); with ``on_error="raise"`` the error names the shard
    and line. A full epoch without one usable record is an error (the source is empty).
    """

    def __init__(
        self,
        pattern: str | Path,
        check: Callable[[Any, str], dict[str, Any]],
        on_error: str = "raise",
        seed: int = 0,
        counts: dict[str, int] | None = None,
    ) -> None:
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got '{on_error}'")
        self.pattern, self.check, self.on_error, self.seed = str(pattern), check, on_error, seed
        self.shards = shard_paths(pattern)
        self.counts = counts if counts is not None else {}
        # epoch, index into the epoch's shard order, byte offset and line number in that shard
        self.position = [0, 0, 0, 0]
        self._file: tuple[int, int, IO[bytes]] | None = None  # (epoch, k, handle)
        self._usable_this_epoch = False

    def _order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.shards), generator=g).tolist()

    def _handle(self, epoch: int, k: int, offset: int) -> IO[bytes]:
        if self._file is None or self._file[:2] != (epoch, k):
            if self._file is not None:
                self._file[2].close()
            handle = open(self.shards[self._order(epoch)[k]], "rb")  # noqa: SIM115
            handle.seek(offset)
            self._file = (epoch, k, handle)
        return self._file[2]

    def next(self) -> dict[str, Any] | None:
        while True:
            epoch, k, offset, line_no = self.position
            if k == len(self.shards):  # the epoch is over
                if not self._usable_this_epoch:
                    raise ValueError(f"streaming source '{self.pattern}' holds no usable records")
                self.position = [epoch + 1, 0, 0, 0]
                self._usable_this_epoch = False
                continue
            handle = self._handle(epoch, k, offset)
            line = handle.readline()
            if not line:
                self.position = [epoch, k + 1, 0, 0]
                continue
            self.position = [epoch, k, offset + len(line), line_no + 1]
            if not line.strip():
                continue
            shard = self.shards[self._order(epoch)[k]]
            where = f"{shard}:{line_no + 1}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                error: Exception = ConversationError(
                    f"{where}: malformed JSON: {e.msg} (column {e.colno})"
                )
            else:
                try:
                    record = self.check(record, where)
                    self._usable_this_epoch = True
                    return record
                except ConversationError as e:
                    error = e
            if self.on_error == "raise":
                raise error
            self.counts["bad_records"] = self.counts.get("bad_records", 0) + 1
            return None

    def state_dict(self) -> dict[str, Any]:
        return {
            "pattern": self.pattern,
            "shards": [p.name for p in self.shards],
            "position": list(self.position),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["shards"] != [p.name for p in self.shards]:
            raise ValueError(
                f"stream state is for shards {state['shards'][:3]}..., but '{self.pattern}' now "
                f"holds {[p.name for p in self.shards][:3]}...; the shards of a resumed run must "
                "not change"
            )
        if self._file is not None:
            self._file[2].close()
            self._file = None
        self.position = list(state["position"])
        self._usable_this_epoch = True
