"""Checkpoint directories: atomic writes and strict safetensors loading."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from metamorph_core.errors import CheckpointError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


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


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"'{path.parent}' is not a MetaMorph checkpoint: no {path.name}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e


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
