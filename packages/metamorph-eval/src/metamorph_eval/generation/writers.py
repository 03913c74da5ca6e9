"""Image layouts that official benchmark scorers read unchanged.

GenEval (``evaluation/evaluate_images.py IMAGEDIR``), one folder per prompt, named by the
prompt's 0-based line number in ``prompts/evaluation_metadata.jsonl``, zero-padded to 5 digits::

    OUT/
        00000/
            metadata.jsonl      # that prompt's JSON object from evaluation_metadata.jsonl,
                                # unchanged, on one line (GenEval reads it with json.load)
            samples/
                0000.png        # image k of the prompt, k zero-padded to 4 digits,
                0001.png        # k = 0 .. images per prompt - 1 (GenEval's default: 4)
                ...
        00001/
            ...

(GenEval's optional ``grid.png`` is not written: its scorer does not read it.)

DPG-Bench (``compute_dpg_bench.py --image-root-path OUT --resolution R --pic-num 4``), one PNG
per prompt, named by the prompt's item id (the name of its ``prompts/<id>.txt`` file, which the
scorer gets back as the file name up to its first dot)::

    OUT/
        <id>.png                # a 2R x 2R grid of the prompt's 4 images, each resized to
                                # R x R: image 0 top left, 1 top right, 2 bottom left,
                                # 3 bottom right (the order the scorer crops them in)
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

DPG_IMAGES = 4


def geneval_folder(out: str | Path, index: int) -> Path:
    """The GenEval folder of prompt ``index``: ``OUT/<index:05d>``."""
    if index < 0:
        raise ValueError(f"a GenEval prompt index is >= 0, got {index}")
    return Path(out) / f"{index:05d}"


def write_geneval(
    out: str | Path, index: int, metadata: dict[str, Any], images: Sequence[Any]
) -> list[Path]:
    """Write prompt ``index``'s GenEval folder: ``metadata.jsonl`` (``metadata``, one line)
    and ``samples/<k:04d>.png`` for each of ``images`` (PIL images or paths of image files);
    returns the files written. Files are replaced atomically, so a rerun rewrites a folder
    cut short."""
    if not images:
        raise ValueError(f"GenEval prompt {index}: no images to write")
    if "prompt" not in metadata:
        raise ValueError(
            f"GenEval prompt {index}: the metadata has no 'prompt' (expected the prompt's "
            "line of evaluation_metadata.jsonl)"
        )
    folder = geneval_folder(out, index)
    (folder / "samples").mkdir(parents=True, exist_ok=True)
    written = [folder / "metadata.jsonl"]
    _write_text(written[0], json.dumps(metadata, ensure_ascii=False) + "\n")
    for k, image in enumerate(images):
        written.append(folder / "samples" / f"{k:04d}.png")
        save_png(_open(image), written[-1])
    return written


def dpg_grid(images: Sequence[Any], resolution: int | None = None) -> Any:
    """The 2x2 grid DPG-Bench scores: 4 images (PIL or paths), each resized to ``resolution``
    square (``None``: the first image's width, when all are square and that size), in the
    order top left, top right, bottom left, bottom right."""
    from PIL import Image

    if len(images) != DPG_IMAGES:
        raise ValueError(
            f"DPG-Bench scores a 2x2 grid of {DPG_IMAGES} images per prompt, got "
            f"{len(images)}; generate with --images-per-prompt 4"
        )
    tiles = [_open(img) for img in images]
    if resolution is None:
        w, h = tiles[0].size
        if w != h or any(t.size != (w, h) for t in tiles):
            raise ValueError(
                f"DPG-Bench tiles are square and of one size, got {[t.size for t in tiles]}; "
                "pass a grid resolution"
            )
        resolution = w
    if resolution < 1:
        raise ValueError(f"the grid resolution must be >= 1, got {resolution}")
    grid = Image.new("RGB", (2 * resolution, 2 * resolution))
    for k, tile in enumerate(tiles):
        if tile.size != (resolution, resolution):
            tile = tile.resize((resolution, resolution), Image.Resampling.BICUBIC)
        grid.paste(tile, ((k % 2) * resolution, (k // 2) * resolution))
    return grid


def dpg_path(out: str | Path, item_id: str) -> Path:
    """``OUT/<item_id>.png``; an id the scorer could not map back (a dot, a path separator,
    empty) is an error."""
    if not item_id or "." in item_id or "/" in item_id or os.sep in item_id:
        raise ValueError(
            f"DPG-Bench item id {item_id!r} cannot name an image: the scorer takes the file "
            "name up to its first dot as the id; use the prompts/<id>.txt file names"
        )
    return Path(out) / f"{item_id}.png"


def write_dpg(
    out: str | Path, item_id: str, images: Sequence[Any], resolution: int | None = None
) -> Path:
    """Write ``OUT/<item_id>.png``, the :func:`dpg_grid` of the prompt's 4 images."""
    path = dpg_path(out, item_id)
    grid = dpg_grid(images, resolution)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_png(grid, path)
    return path


def save_png(image: Any, path: Path) -> None:
    """Save a PIL image as PNG at ``path`` atomically (a kill leaves no half file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _open(image: Any) -> Any:
    if isinstance(image, (str, Path)):
        from metamorph_eval.generation.images import read_image

        return read_image(image)
    return image.convert("RGB")
