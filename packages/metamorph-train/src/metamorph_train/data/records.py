"""Reading LLaVA-compatible records from JSON (a list) or JSONL (one object a line).

A record is ``{"id", "image": str | [str], "conversations": [{"from": "human"|"gpt", "value":
"... <image> ..."}]}``; an ``<image>`` in a ``gpt`` turn is a generation target. A malformed
line or record raises naming the file and line, or, with ``on_error="skip"``, is skipped and
counted.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from metamorph_core.errors import ConversationError

ROLES = {"human", "gpt", "system", "user", "assistant"}


def check_record(record: Any, where: str) -> dict[str, Any]:
    """Validate one record's shape; the error names ``where`` (file and line) and the problem."""
    if not isinstance(record, dict):
        raise ConversationError(
            f"{where}: a record must be a JSON object, got {type(record).__name__}"
        )
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise ConversationError(
            f"{where}: record {record.get('id')!r} needs a non-empty 'conversations' list"
        )
    for k, turn in enumerate(turns):
        if (
            not isinstance(turn, dict)
            or turn.get("from") not in ROLES
            or not isinstance(turn.get("value"), str)
        ):
            raise ConversationError(
                f"{where}: record {record.get('id')!r}, turn {k}: expected "
                "{'from': 'human'|'gpt'|'system', 'value': str}"
            )
    images = _image_paths(record, where)
    placeholders = sum(t["value"].count("<image>") for t in turns)
    if placeholders != len(images):
        raise ConversationError(
            f"{where}: record {record.get('id')!r} has {placeholders} '<image>' placeholder(s) "
            f"but {len(images)} image path(s)"
        )
    return record


def _image_paths(record: dict[str, Any], where: str) -> list[str]:
    image = record.get("image", [])
    images = [image] if isinstance(image, str) else image
    if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
        raise ConversationError(
            f"{where}: record {record.get('id')!r}: 'image' must be a path or a list of paths"
        )
    return images


def check_pair_record(record: Any, where: str) -> dict[str, Any]:
    """An image-caption pair ``{"id"?, "image": str, "caption": str}`` (encoder pretraining)."""
    if not isinstance(record, dict):
        raise ConversationError(f"{where}: a record must be a JSON object")
    if not isinstance(record.get("image"), str) or not isinstance(record.get("caption"), str):
        raise ConversationError(
            f"{where}: record {record.get('id')!r}: an image-caption pair needs "
            "'image' (a path) and 'caption' (a string)"
        )
    return record


def check_image_record(record: Any, where: str) -> dict[str, Any]:
    """Any record (a conversation, a pair, ...) whose ``image``, if present, is a path or a
    list of paths; only the images are read (decoder training, feature caching)."""
    if not isinstance(record, dict):
        raise ConversationError(f"{where}: a record must be a JSON object")
    _image_paths(record, where)
    return record


def check_text_record(record: Any, where: str) -> dict[str, Any]:
    """Text for language-model pretraining: ``{"text": str}``, or a conversation without
    images (its turns joined by newlines)."""
    if isinstance(record, dict) and isinstance(record.get("text"), str):
        return record
    record = check_record(record, where)
    if _image_paths(record, where):
        raise ConversationError(
            f"{where}: record {record.get('id')!r} has images; language-model pretraining "
            "reads text only ('text', or a conversation without images)"
        )
    return record


def record_text(record: dict[str, Any]) -> str:
    """The text of a record that :func:`check_text_record` accepted."""
    if isinstance(record.get("text"), str):
        return record["text"]
    return "\n".join(t["value"] for t in record["conversations"])


def iter_records(
    path: str | Path,
    on_error: str = "raise",
    counts: dict[str, int] | None = None,
    check: Callable[[Any, str], dict[str, Any]] = check_record,
) -> Iterator[dict[str, Any]]:
    """Records of a ``.json`` or ``.jsonl`` file, validated by ``check`` (default: LLaVA
    conversations). ``counts['bad_records']`` counts the skipped ones when
    ``on_error="skip"``."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got '{on_error}'")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file '{path}' does not exist")
    counts = counts if counts is not None else {}

    def bad(error: Exception) -> None:
        if on_error == "raise":
            raise error
        counts["bad_records"] = counts.get("bad_records", 0) + 1

    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{line_no}"
                try:
                    yield check(json.loads(line), where)
                except json.JSONDecodeError as e:
                    bad(ConversationError(f"{where}: malformed JSON: {e.msg} (column {e.colno})"))
                except ConversationError as e:
                    bad(e)
    elif path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ConversationError(f"{path}:{e.lineno}: malformed JSON: {e.msg}") from e
        if not isinstance(data, list):
            raise ConversationError(f"{path}: a .json data file holds a list of records")
        for k, record in enumerate(data):
            try:
                yield check(record, f"{path}[{k}]")
            except ConversationError as e:
                bad(e)
    else:
        raise ValueError(
            f"data file '{path}': use .json (a list of records) or .jsonl (one a line)"
        )


def read_records(
    path: str | Path,
    on_error: str = "raise",
    counts: dict[str, int] | None = None,
    check: Callable[[Any, str], dict[str, Any]] = check_record,
) -> list[dict[str, Any]]:
    """All records of a file (see :func:`iter_records`)."""
    return list(iter_records(path, on_error, counts, check))
