"""Checkpoint directories: atomic writes, strict safetensors loading, and a cheap check that
finds damaged files (truncated or corrupt safetensors, invalid JSON, Git LFS pointers, broken
links) before any loader reads them, so that the error names the file."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from metamorph_core.errors import CheckpointError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
_LFS_POINTER = b"version https://git-lfs.github.com/spec/"
_MAX_HEADER = 100_000_000  # the largest safetensors header that safetensors itself reads


def is_checkpoint(path: Path, fmt: str) -> bool:
    """Whether ``path`` holds a ``config.json`` of format (or transformers ``model_type``)
    ``fmt``."""
    try:
        config = json.loads((path / CONFIG_NAME).read_text())
        return fmt in (config.get("format"), config.get("model_type"))
    except (OSError, ValueError, AttributeError):
        return False


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_directory(path: str | Path, fmt: str) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``path``.

    ``path`` may be missing, empty, or an earlier checkpoint of format ``fmt``; anything else
    is refused, so saving never deletes a user's other files. A failure at any point leaves
    ``path`` as it was and removes the temporary directory.
    """
    path = Path(path)
    if path.exists() and not (
        path.is_dir() and (not any(path.iterdir()) or is_checkpoint(path, fmt))
    ):
        raise CheckpointError(
            f"refusing to save into '{path}': it exists and is not a {fmt} checkpoint (saving "
            "replaces the whole directory); pick a new or empty directory"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        old = None
        if path.exists():
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            path.rename(old)
        try:
            tmp.rename(path)
        except BaseException:
            if old is not None:
                old.rename(path)
            raise
        _fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    raise TypeError(f"{type(value).__name__} {value!r}")


def jsonable(data: Any) -> Any:
    """``data`` as it reads back from JSON (paths and dtypes become strings)."""
    return json.loads(json.dumps(data, default=_json_default))


def write_json(path: Path, data: dict[str, Any]) -> None:
    try:
        text = json.dumps(data, indent=2, sort_keys=True, default=_json_default)
    except TypeError as e:
        raise CheckpointError(
            f"cannot write {path.name}: a value is not JSON-serialisable ({e}); pass component "
            "kwargs as plain numbers, strings, lists and dicts"
        ) from e
    path.write_text(text + "\n")


def read_json(path: Path, root: Path | None = None, what: str = "checkpoint") -> dict[str, Any]:
    """The JSON object in ``path``; a damaged file is a :class:`CheckpointError` naming it (as a
    path relative to ``root``, the ``what``'s directory, when given) and the fix."""
    if not path.is_file():
        raise CheckpointError(f"'{path.parent}' is not a MetaMorph checkpoint: no {path.name}")
    data, problem = _parse_json(path.read_bytes())
    if problem is None and not isinstance(data, dict):
        problem = f"holds a JSON {type(data).__name__}, not an object"
    if problem is not None:
        raise damaged_files(root or path.parent, [(path, problem)], what)
    return data


def _parse_json(data: bytes) -> tuple[Any, str | None]:
    """The parsed ``data`` and ``None``, or ``None`` and what is wrong with it."""
    if not data.strip():
        return None, "is empty"
    if data.startswith(_LFS_POINTER):
        return None, "is a Git LFS pointer, not the file itself (fetch it: git lfs pull)"
    try:
        return json.loads(data), None
    except UnicodeDecodeError:
        return None, "is not valid JSON (not UTF-8 text)"
    except json.JSONDecodeError as e:
        return None, f"is not valid JSON ({e.msg}: line {e.lineno}, column {e.colno})"


def safetensors_problem(path: Path) -> str | None:
    """What is wrong with the safetensors file ``path`` (truncated, not safetensors, a corrupt
    header), or ``None``. Reads the header only: the 8-byte header length, the JSON header, and
    the file size against the end of the last tensor it describes."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        start = fh.read(len(_LFS_POINTER))
        if start == _LFS_POINTER:
            return "is a Git LFS pointer, not the weights (fetch them: git lfs pull)"
        if size < 8:
            return f"is truncated: {size} bytes, too short for a safetensors header"
        fh.seek(0)
        n = int.from_bytes(fh.read(8), "little")
        if n > _MAX_HEADER:
            return (
                f"is not a safetensors file, or its header is corrupt: its first 8 bytes "
                f"declare a {n:,}-byte header"
            )
        if 8 + n > size:
            return f"is truncated: {size:,} bytes, but its header alone needs {8 + n:,}"
        header, problem = _parse_json(fh.read(n))
    if problem is not None or not isinstance(header, dict):
        return "has a corrupt header (not the JSON object safetensors writes)"
    try:
        end = max(
            (int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"),
            default=0,
        )
    except (TypeError, KeyError, IndexError, ValueError):
        return "has a corrupt header (a tensor entry without valid data_offsets)"
    if 8 + n + end > size:
        return f"is truncated: {size:,} bytes, but its header describes {8 + n + end:,}"
    if 8 + n + end < size:
        return (
            f"has a corrupt header, or data appended: {size:,} bytes, but its header "
            f"describes {8 + n + end:,}"
        )
    return None


def file_problem(path: Path) -> str | None:
    """What is wrong with ``path``, a file a loader reads, or ``None``: safetensors and JSON
    files are checked (:func:`safetensors_problem`, a JSON parse), any file for a broken link."""
    if path.is_symlink() and not path.exists():
        return f"is a link to '{os.readlink(path)}', which does not exist (an incomplete download?)"
    if path.suffix == ".safetensors":
        return safetensors_problem(path)
    if path.suffix == ".json":
        return _parse_json(path.read_bytes())[1]
    return None


def check_files(root: Path, what: str = "checkpoint", expected: Iterable[str] = ()) -> None:
    """Check every safetensors and JSON file under the directory ``root`` (hidden files and
    folders aside) with :func:`file_problem`, and that each of the ``expected`` paths (relative
    to ``root``) is a file; a :class:`CheckpointError` names each missing or damaged one.
    ``what`` names ``root`` in the message (``"checkpoint"``, ``"model directory"``)."""
    found = _missing(root, expected)
    for path in sorted(root.rglob("*")):
        if any(part.startswith(".") for part in path.relative_to(root).parts):
            continue
        if path.is_file() or path.is_symlink():
            problem = file_problem(path)
            if problem is not None:
                found.append((path, problem))
    if found:
        raise damaged_files(root, found, what)


def _missing(root: Path, expected: Iterable[str]) -> list[tuple[Path, str]]:
    """The ``expected`` files that are not under ``root``: a missing folder once, not each of
    its files."""
    found: dict[Path, str] = {}
    for name in expected:
        if (root / name).is_file():
            continue
        folders = reversed(PurePosixPath(name).parents[:-1])  # outermost first
        gone = next((root / f for f in folders if not (root / f).is_dir()), None)
        found.setdefault(gone or root / name, "folder is missing" if gone else "is missing")
    return list(found.items())


def damaged_files(
    root: Path, found: list[tuple[Path, str]], what: str = "checkpoint"
) -> CheckpointError:
    """The error for the files ``found`` (path, what is wrong: ``"is missing"``, ``"is
    truncated: ..."``) of the ``what`` (e.g. ``"checkpoint"``) in ``root``: each by its path
    relative to ``root`` and its absolute path, then the fix."""
    files = "; ".join(
        f"{path.relative_to(root).as_posix()} {problem} ('{path}')" for path, problem in found
    )
    if len(found) > 1:
        files = f"{len(found)} files are missing or damaged: {files}"
    them = "the file" if len(found) == 1 else "them"
    return CheckpointError(
        f"{what} '{root}': {files}. The {what} is incomplete or damaged (an interrupted copy or "
        f"download?): restore {them} from a good copy, or save or download the {what} again"
    )


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    # safetensors refuses shared storage; contiguous clones keep tied parameters safe.
    save_file({k: v.detach().contiguous().clone() for k, v in tensors.items()}, str(path), metadata)


def load_tensors_strict(
    path: Path, expected: dict[str, torch.Tensor], where: str
) -> dict[str, torch.Tensor]:
    """Load ``path`` and require exactly the keys and shapes of ``expected``."""
    if not path.is_file():
        raise CheckpointError(f"{where}: missing weights file {path}")
    tensors = load_file(str(path))
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise CheckpointError(
            f"{where}: {path.name} does not match the model built from its config.json. "
            f"Missing weights ({len(missing)}): {missing[:10]}; unexpected weights "
            f"({len(extra)}): {extra[:10]}. The checkpoint is incomplete or was written for "
            "other components."
        )
    wrong = [
        f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if tuple(tensors[k].shape) != tuple(v.shape)
    ]
    if wrong:
        raise CheckpointError(f"{where}: weight shapes differ from the config: {wrong[:10]}")
    return tensors
