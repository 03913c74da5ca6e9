"""The JSONL layout of evaluation data a user has locally. One record a line::

    {"id": "q1", "question": "What is the cat doing?", "image": "cats/1.jpg",
     "answers": ["sleeping", "sleeping", "lying down"]}
    {"id": "q2", "question": "<image>\\nWhich colour is the car?", "images": ["cars/2.jpg"],
     "options": {"A": "red", "B": "blue", "C": "green"}, "answer": "B", "category": "colour"}

- ``id``: unique in the file (required: results are kept per id, and a rerun skips finished ids).
- ``question``: the user's message; an ``<image>`` in it marks where an image stands, else the
  images come before it.
- ``image`` (one path) or ``images`` (a list): relative to the image root; may be absent for
  text-only tasks.
- ``answer`` (one string) or ``answers`` (a list; VQA's ten human answers): the reference.
- ``options``: for multiple choice, ``{"A": text, ...}`` or a list (lettered A, B, ... in
  order); then ``answer`` is a letter.
- anything else (``category``, ``split``...) is kept as metadata; ``category`` gives
  per-category metrics.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LETTERS = string.ascii_uppercase


class RecordError(ValueError):
    """A record that cannot be evaluated; the message names the file, the line and the id."""


@dataclass
class EvalRecord:
    """One evaluation sample as read from the JSONL layout."""

    id: str
    question: str
    images: list[str] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)
    options: dict[str, str] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def category(self) -> str | None:
        value = self.meta.get("category")
        return None if value is None else str(value)


def parse_record(data: Any, where: str) -> EvalRecord:
    """A record from its JSON value; a bad one is a :class:`RecordError` naming ``where``."""
    if not isinstance(data, dict):
        raise RecordError(f"{where}: a record must be a JSON object, got {type(data).__name__}")
    rid = data.get("id")
    if rid is None or isinstance(rid, (dict, list)):
        raise RecordError(f"{where}: the record has no 'id' (a string or number)")
    rid = str(rid)
    question = data.get("question")
    if not isinstance(question, str) or not question.strip():
        raise RecordError(f"{where} (id {rid!r}): no 'question' text")
    if "image" in data and "images" in data:
        raise RecordError(f"{where} (id {rid!r}): give 'image' or 'images', not both")
    images = data.get("images", data.get("image", []))
    images = [images] if isinstance(images, str) else images
    if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
        raise RecordError(f"{where} (id {rid!r}): 'images' must be a list of paths")
    if "answer" in data and "answers" in data:
        raise RecordError(f"{where} (id {rid!r}): give 'answer' or 'answers', not both")
    answers = data.get("answers", data.get("answer"))
    if answers is None:
        raise RecordError(f"{where} (id {rid!r}): no 'answer' or 'answers' to score against")
    answers = [answers] if isinstance(answers, (str, int, float)) else answers
    if not isinstance(answers, list) or not answers:
        raise RecordError(f"{where} (id {rid!r}): 'answers' must be a non-empty list")
    answers = [str(a) for a in answers]
    options = data.get("options") or {}
    if isinstance(options, list):
        if len(options) > len(LETTERS):
            raise RecordError(f"{where} (id {rid!r}): more than 26 options")
        options = {LETTERS[i]: str(o) for i, o in enumerate(options)}
    if not isinstance(options, dict):
        raise RecordError(f"{where} (id {rid!r}): 'options' must be an object or a list")
    options = {str(k).strip().upper(): str(v) for k, v in options.items()}
    if options and (len(answers) != 1 or answers[0].strip().upper() not in options):
        raise RecordError(
            f"{where} (id {rid!r}): a multiple-choice 'answer' must be one of its option "
            f"letters {sorted(options)}, got {answers}"
        )
    if options:
        answers = [answers[0].strip().upper()]
    known = {"id", "question", "image", "images", "answer", "answers", "options"}
    meta = {k: v for k, v in data.items() if k not in known}
    return EvalRecord(rid, question, images, answers, options, meta)


def read_records(
    path: str | Path, on_error: str = "raise", counts: dict[str, int] | None = None
) -> list[EvalRecord]:
    """Every record of a JSONL file (a ``.json`` file holding a list works too). A bad record
    raises a :class:`RecordError` naming the file, line and id, or with ``on_error="skip"``
    is left out and counted in ``counts["bad_records"]``. Duplicate ids are always an error."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"evaluation data '{path}' not found")
    counts = counts if counts is not None else {}
    text = path.read_text()
    if path.suffix == ".json":
        rows = [(f"{path}[{i}]", row) for i, row in enumerate(json.loads(text))]
    else:
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append((f"{path}:{n}", json.loads(line)))
            except json.JSONDecodeError as e:
                rows.append((f"{path}:{n}", RecordError(f"{path}:{n}: not JSON ({e})")))
    out: list[EvalRecord] = []
    seen: dict[str, str] = {}
    for where, row in rows:
        try:
            if isinstance(row, RecordError):
                raise row
            record = parse_record(row, where)
        except RecordError:
            if on_error == "raise":
                raise
            counts["bad_records"] = counts.get("bad_records", 0) + 1
            continue
        if record.id in seen:
            raise RecordError(f"{where}: id {record.id!r} repeats {seen[record.id]}")
        seen[record.id] = where
        out.append(record)
    if not out:
        raise RecordError(f"'{path}' holds no usable records")
    return out
