"""Hugging Face ``datasets`` as a streaming source (``format: hf``; needs datasets).

Layout. ``path`` is either

- a directory written by ``Dataset.save_to_disk`` (it holds ``state.json``); a ``DatasetDict``
  saves one directory per split: name it (``data/hf/train``); or
- local data files, by a directory, glob or brace pattern, all ``.parquet``, all
  ``.json``/``.jsonl``, all ``.csv`` or all ``.arrow``: loaded with
  ``datasets.load_dataset(<builder>, data_files=..., split="train")``, which works offline and
  keeps an Arrow copy in the ``datasets`` cache (``HF_DATASETS_CACHE``).

Rows are read as Arrow, memory-mapped, and become records exactly as parquet rows do
(:func:`~.parquet_source.row_record`): an ``Image`` feature (or a list of them) is stored as
``{bytes, path}`` and comes as :class:`~.sources.ImageBytes` (bytes) or as a path relative to
the source's ``image_root``; ``image_names`` (written by ``metamorph data convert --to hf``)
keeps the original image paths, which ``save_to_disk`` cuts to file names.

State: ``position = [epoch, k, j]``. The rows are cut into blocks of 256 (the "shards"); an
epoch reads the blocks in a seeded order and each block's rows in a seeded order, ``k``
indexing the epoch's block order and ``j`` the row within the block. The number of rows is
saved and checked on resume. A block that cannot be read raises naming the dataset and its rows
(``bad_shards`` when skipped); a bad row names the dataset and the row index.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from metamorph_train.data.parquet_source import row_record
from metamorph_train.data.sources import ShardError, ShardStream, list_files, permutation

BLOCK_ROWS = 256
_BUILDERS = {
    ".parquet": "parquet",
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".arrow": "arrow",
}


def load_hf_dataset(path: str | Path) -> Any:
    """The ``datasets.Dataset`` a source names (see the module)."""
    try:
        import datasets
    except ImportError as e:
        raise ImportError(
            "hf sources need the datasets package: pip install metamorph-train[hf]"
        ) from e
    p = Path(path)
    if p.is_dir() and (p / "dataset_dict.json").is_file():
        splits = json.loads((p / "dataset_dict.json").read_text()).get("splits", [])
        raise ValueError(
            f"hf source '{p}' is a DatasetDict with splits {splits}; name one split's "
            f"directory, e.g. path: {p / (splits[0] if splits else 'train')}"
        )
    if p.is_dir() and (p / "state.json").is_file():
        data = datasets.load_from_disk(str(p))
        if not isinstance(data, datasets.Dataset):
            raise ValueError(f"hf source '{p}' holds a {type(data).__name__}, not a Dataset")
        return data
    files = list_files(path, tuple(_BUILDERS), "hf")
    kinds = {_BUILDERS[f.suffix] for f in files}
    if len(kinds) > 1:
        raise ValueError(
            f"hf source '{path}' mixes data file kinds {sorted(kinds)}; name files of one kind"
        )
    return datasets.load_dataset(kinds.pop(), data_files=[str(f) for f in files], split="train")


class HFStream(ShardStream):
    """An endless, resumable stream of records from a ``datasets.Dataset`` (the module gives
    the layout and the state)."""

    format = "hf"
    _transient = ("_block",)

    def __init__(
        self,
        path: str | Path,
        check: Callable[[Any, str], dict[str, Any]],
        on_error: str = "raise",
        seed: int = 0,
        counts: dict[str, int] | None = None,
    ) -> None:
        self.data = load_hf_dataset(path).with_format("arrow")
        self.rows = len(self.data)
        self._block: tuple[int, int, list[tuple[int, dict[str, Any]]]] | None = None
        blocks = -(-self.rows // BLOCK_ROWS)
        super().__init__(path, check, on_error, seed, counts, blocks)

    def _identity(self) -> dict[str, Any]:
        return {"rows": self.rows, "block_rows": BLOCK_ROWS}

    def _close(self) -> None:
        self._block = None

    def _rows(self, epoch: int, block: int) -> list[tuple[int, dict[str, Any]]]:
        if self._block is None or self._block[:2] != (epoch, block):
            start = block * BLOCK_ROWS
            end = min(start + BLOCK_ROWS, self.rows)
            try:
                rows = self.data[start:end].to_pylist()
            except Exception as e:  # noqa: BLE001 - arrow and datasets raise many kinds
                raise ShardError(
                    f"hf source '{self.pattern}': cannot read rows {start}-{end - 1}: {e}; "
                    "re-create the dataset, or set data.on_error: skip to skip them"
                ) from e
            order = permutation(len(rows), self.seed, epoch, block + 1)
            self._block = (epoch, block, [(start + i, rows[i]) for i in order])
        return self._block[2]

    def _read(self, epoch: int, shard: int, within: list[int]) -> tuple[Any, str, list[int]] | None:
        rows = self._rows(epoch, shard)
        j = within[0]
        if j >= len(rows):
            return None
        index, row = rows[j]
        where = f"hf source '{self.pattern}' row {index}"
        return row_record(row, where), where, [j + 1]
