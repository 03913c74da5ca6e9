"""Reading LLaVA-compatible records from JSON (a list) or JSONL (one object a line).

A record is ``{"id", "image": str | [str], "conversations": [{"from": "human"|"gpt", "value":
"... <image> ..."}]}``; an ``<image>`` in a ``gpt`` turn is a generation target. A malformed
line or record raises naming the file and line, or, with ``on_error="skip"``, is skipped and
counted.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
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
    image = record.get("image", [])
    images = [image] if isinstance(image, str) else image
    if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
        raise ConversationError(
            f"{where}: record {record.get('id')!r}: 'image' must be a path or a list of paths"
        )
    placeholders = sum(t["value"].count("<image>") for t in turns)
    if placeholders != len(images):
        raise ConversationError(
            f"{where}: record {record.get('id')!r} has {placeholders} '<image>' placeholder(s) "
            f"but {len(images)} image path(s)"
        )
    return record


def iter_records(
    path: str | Path, on_error: str = "raise", counts: dict[str, int] | None = None
) -> Iterator[dict[str, Any]]:
    """Records of a ``.json`` or ``.jsonl`` file, validated. ``counts['bad_records']`` counts
    the skipped ones when ``on_error="skip"``."""
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
                    yield check_record(json.loads(line), where)
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
                yield check_record(record, f"{path}[{k}]")
            except ConversationError as e:
                bad(e)
    else:
        raise ValueError(
            f"data file '{path}': use .json (a list of records) or .jsonl (one a line)"
        )


def read_records(
    path: str | Path, on_error: str = "raise", counts: dict[str, int] | None = None
) -> list[dict[str, Any]]:
    """All records of a file (see :func:`iter_records`)."""
    return list(iter_records(path, on_error, counts))
