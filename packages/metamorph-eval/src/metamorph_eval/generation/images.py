"""Image folders for generation metrics: listing a reference folder, reading an image with an
error that names the file, and reading many with ``on_error`` ``"raise"`` or ``"skip"``
(skipped files are counted)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

#: file name endings read as images in a reference folder (other files are ignored)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
ON_ERROR = ("raise", "skip")


class UnreadableImageError(ValueError):
    """An image file that cannot be decoded; the message names the file."""


def list_images(folder: str | Path) -> list[Path]:
    """Every image file under ``folder`` (recursively, by :data:`IMAGE_SUFFIXES`, any case),
    sorted by relative path. An absent or image-less folder is an error naming it."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"--reference '{root}': no such directory")
    paths = sorted(
        (p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    if not paths:
        raise ValueError(
            f"--reference '{root}' holds no images (looked for {', '.join(IMAGE_SUFFIXES)})"
        )
    return paths


def folder_key(paths: Sequence[Path]) -> str:
    """A sha256 over the paths, sizes and modification times of ``paths``: it changes when a
    file is added, removed or rewritten (used to reuse cached reference statistics)."""
    digest = hashlib.sha256()
    for p in paths:
        st = os.stat(p)
        digest.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def read_image(path: str | Path) -> Any:
    """An RGB PIL image from ``path``, fully decoded; a file PIL cannot decode is an
    :class:`UnreadableImageError` naming it."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except (OSError, ValueError, SyntaxError) as e:  # PIL raises all three on bad data
        raise UnreadableImageError(
            f"cannot read image '{path}': {e}; fix or remove the file, or pass --on-error skip "
            "to leave it out (it is counted in results.json)"
        ) from e


def iter_image_batches(
    paths: Sequence[Path],
    batch_size: int,
    on_error: str = "raise",
    skipped: list[str] | None = None,
) -> Iterator[list[Any]]:
    """Batches of at most ``batch_size`` decoded RGB images of ``paths``, in order. An
    unreadable file raises (:class:`UnreadableImageError`) or, with ``on_error="skip"``, is
    left out and its path appended to ``skipped``."""
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    batch: list[Any] = []
    for path in paths:
        try:
            batch.append(read_image(path))
        except UnreadableImageError:
            if on_error == "raise":
                raise
            if skipped is not None:
                skipped.append(str(path))
            continue
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch
