"""Converting LLaVA records into the streaming formats (``metamorph data convert``).

Input: a ``.json`` (a list) or ``.jsonl`` file of records in the JSONL schema (conversations,
image-caption pairs, text) whose images are files under ``image_root``. Output: a new (or
empty) directory, the images embedded as their files' bytes, unchanged:

- ``webdataset``: ``shard-000000.tar``, ... of ``shard_size`` samples; sample ``n`` (key: ``n``
  as 9 digits) is ``KEY.json`` (the record as it is, image paths included) and ``KEY.<i>.<ext>``
  for its ``i``-th image (:mod:`.webdataset_source`).
- ``parquet``: ``part-000000.parquet``, ... of ``shard_size`` rows in row groups of 256: a
  column per record key, ``conversations`` a list of structs, ``image`` a ``{bytes, path}``
  struct (when no record has a list of images) or a list of them (:mod:`.parquet_source`).
- ``hf``: a ``datasets.Dataset`` saved with ``save_to_disk`` in shards of ``shard_size`` rows:
  the parquet columns with ``image`` an ``Image()`` feature (or a list of them) and
  ``image_names`` the original paths (:mod:`.hf_source`).

Read back through the sources, the records equal the input's, image names included, with one
exception: in ``parquet`` and ``hf`` output where some record has a list of images, an image
given as a string comes back as a one-element list. A shard is written under a temporary name
and renamed when complete, so an interrupted conversion leaves only whole shards.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from metamorph_train.data.images import ImageRoot
from metamorph_train.data.records import check_image_record, iter_records

TARGETS = ("webdataset", "parquet", "hf")
ROW_GROUP = 256
Sample = tuple[dict[str, Any], list[tuple[str, bytes]]]


def _names(record: dict[str, Any]) -> list[str]:
    image = record.get("image")
    return [] if image is None else [image] if isinstance(image, str) else list(image)


def _samples(
    path: Path, root: ImageRoot | None, on_error: str, counts: dict[str, int]
) -> Iterator[Sample]:
    """Each record with its images' bytes; a record whose image is missing raises naming it, or
    is counted (``missing_images``) and left out."""
    for record in iter_records(path, on_error, counts, check_image_record):
        rid = record.get("id")
        try:
            if _names(record) and root is None:
                raise ValueError(
                    f"{path}: record {rid!r} names images; give --image-root, the directory "
                    "its image paths are relative to"
                )
            images = []
            for name in _names(record):
                file = root.resolve(name, rid)  # type: ignore[union-attr]
                if not file.is_file():
                    raise FileNotFoundError(
                        f"{path}: record {rid!r}: image '{name}' not found at '{file}'"
                    )
                images.append((name, file.read_bytes()))
        except (OSError, ValueError):
            if on_error == "raise":
                raise
            counts["missing_images"] = counts.get("missing_images", 0) + 1
            continue
        yield record, images


def _shards(samples: Iterator[Sample], size: int) -> Iterator[list[Sample]]:
    chunk: list[Sample] = []
    for sample in samples:
        chunk.append(sample)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _atomic(path: Path, write: Callable[[Path], None]) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)
    return path


def _write_webdataset(samples: Iterator[Sample], out: Path, size: int) -> list[Path]:
    written: list[Path] = []
    n = 0
    for s, chunk in enumerate(_shards(samples, size)):

        def write(tmp: Path, chunk: list[Sample] = chunk, first: int = n) -> None:
            with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
                for j, (record, images) in enumerate(chunk):
                    key = f"{first + j:09d}"
                    body = json.dumps(record, ensure_ascii=False).encode("utf-8")
                    _add(tar, f"{key}.json", body)
                    for i, (name, data) in enumerate(images):
                        ext = re.sub(r"[^a-z0-9]", "", Path(name).suffix.lower()) or "img"
                        _add(tar, f"{key}.{i}.{ext}", data)

        written.append(_atomic(out / f"shard-{s:06d}.tar", write))
        n += len(chunk)
    return written


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0
    tar.addfile(info, io.BytesIO(data))


def _schema(path: Path, on_error: str, names_column: bool) -> tuple[Any, bool]:
    """One Arrow schema for every record of ``path`` (inferred from the records, chunk by
    chunk), and whether ``image`` is a list."""
    import pyarrow as pa

    schemas, chunk, as_list = [], [], False
    for record in iter_records(path, on_error, {}, check_image_record):
        as_list = as_list or isinstance(record.get("image"), list)
        chunk.append({k: v for k, v in record.items() if k != "image"})
        if len(chunk) == 4096:
            schemas.append(pa.Table.from_pylist(chunk).schema)
            chunk = []
    try:
        schemas.append(pa.Table.from_pylist(chunk).schema)
        schema = pa.unify_schemas(schemas, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise ValueError(
            f"the records of '{path}' cannot share one table schema: {e}; give each key one "
            "type in every record"
        ) from e
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    schema = schema.append(pa.field("image", pa.list_(image) if as_list else image))
    if names_column:
        schema = schema.append(
            pa.field("image_names", pa.list_(pa.string()) if as_list else pa.string())
        )
    return schema, as_list


def _row(
    record: dict[str, Any], images: list[tuple[str, bytes]], as_list: bool, names: bool
) -> dict[str, Any]:
    row = dict(record)
    if "image" in record and record["image"] is not None:
        cells = [{"bytes": data, "path": name} for name, data in images]
        row["image"] = cells if as_list else cells[0]
        if names:
            row["image_names"] = [n for n, _ in images] if as_list else images[0][0]
    return row


def _write_parquet(
    samples: Iterator[Sample], out: Path, size: int, schema: Any, as_list: bool, names: bool
) -> list[Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    written = []
    for s, chunk in enumerate(_shards(samples, size)):

        def write(tmp: Path, chunk: list[Sample] = chunk) -> None:
            with pq.ParquetWriter(tmp, schema) as writer:
                for start in range(0, len(chunk), ROW_GROUP):
                    rows = [_row(r, i, as_list, names) for r, i in chunk[start : start + ROW_GROUP]]
                    writer.write_table(pa.Table.from_pylist(rows, schema=schema))

        written.append(_atomic(out / f"part-{s:06d}.parquet", write))
    return written


def _write_hf(parts: list[Path], out: Path, schema: Any, as_list: bool, work: Path) -> None:
    import datasets

    image, name = datasets.Image(), datasets.Value("string")
    features = datasets.Features.from_arrow_schema(
        schema.remove(schema.get_field_index("image_names")).remove(schema.get_field_index("image"))
    )
    features["image"] = datasets.List(image) if as_list else image
    features["image_names"] = datasets.List(name) if as_list else name
    data = datasets.Dataset.from_parquet(
        [str(p) for p in parts], features=features, cache_dir=str(work / "cache")
    )
    data.save_to_disk(str(out), num_shards=len(parts))


def convert(
    input: str | Path,
    to: str,
    out: str | Path,
    image_root: str | Path | None = None,
    shard_size: int = 1000,
    on_error: str = "raise",
) -> dict[str, Any]:
    """Convert ``input`` into ``to`` (one of :data:`TARGETS`) under ``out`` (see the module);
    returns ``{"records", "images", "shards", "skipped", "source"}`` (``source``: the recipe
    source that reads it)."""
    if to not in TARGETS:
        raise ValueError(f"unknown target format '{to}'; use one of {', '.join(TARGETS)}")
    if shard_size < 1:
        raise ValueError(f"--shard-size must be at least 1, got {shard_size}")
    input, out = Path(input), Path(out)
    if not input.is_file():
        raise FileNotFoundError(f"input '{input}' does not exist (give a .json or .jsonl file)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"output '{out}' exists and is not empty; choose a new directory")
    root = ImageRoot(image_root) if image_root is not None else None
    counts: dict[str, int] = {}
    tally = {"records": 0, "images": 0}

    def counted(samples: Iterator[Sample]) -> Iterator[Sample]:
        for record, images in samples:
            tally["records"] += 1
            tally["images"] += len(images)
            yield record, images

    samples = counted(_samples(input, root, on_error, counts))
    out.mkdir(parents=True, exist_ok=True)
    if to == "webdataset":
        shards = _write_webdataset(samples, out, shard_size)
    elif to == "parquet":
        schema, as_list = _schema(input, on_error, names_column=False)
        shards = _write_parquet(samples, out, shard_size, schema, as_list, names=False)
    else:
        schema, as_list = _schema(input, on_error, names_column=True)
        work = Path(tempfile.mkdtemp(prefix=".convert-", dir=out.parent))
        try:
            parts = _write_parquet(samples, work, shard_size, schema, as_list, names=True)
            if parts:
                _write_hf(parts, out, schema, as_list, work)
            shards = sorted(out.glob("*.arrow"))
        finally:
            shutil.rmtree(work, ignore_errors=True)
    if not tally["records"]:
        raise ValueError(f"'{input}' holds no usable records to convert ({counts or 'empty'})")
    return {
        **tally,
        "shards": [p.name for p in shards],
        "skipped": counts,
        "source": {"path": str(out), "format": to},
    }
