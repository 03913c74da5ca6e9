"""The prompt files ``metamorph eval generation`` reads, as a list of :class:`GenPrompt`.

- ``*.jsonl``: one JSON object a line with a ``"prompt"`` string and optionally an ``"id"``
  (a string or number); every other key is kept as metadata. GenEval's
  ``prompts/evaluation_metadata.jsonl`` is such a file (``prompt``, ``tag``, ``include``...,
  no id): the object is written back unchanged as each GenEval folder's ``metadata.jsonl``.
- a directory of ``*.txt`` files, DPG-Bench's ``dpg_bench/prompts/``: one prompt per file, its
  id the file name without ``.txt`` (the name DPG-Bench's scorer looks the image up by); the
  files are taken in sorted order.
- any other file (``*.txt``): one prompt a line, blank lines skipped.

Without an ``"id"`` a prompt's id is its 0-based index in the file. ``index`` is always that
position; the image seeds and GenEval's folder names derive from it, so it is stable.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class GenPrompt:
    """One prompt: its position ``index`` in the file, ``id``, ``text`` and ``meta`` (the
    whole JSON object of a JSONL line, ``{"prompt": text}`` otherwise)."""

    index: int
    id: str
    text: str
    meta: dict[str, Any] = field(default_factory=dict)


def read_prompts(path: str | Path, limit: int | None = None) -> list[GenPrompt]:
    """The prompts of ``path`` (see the module's docstring for the formats), the first
    ``limit`` when given. Errors name the file, the line and what is expected."""
    path = Path(path)
    if limit is not None and limit < 1:
        raise ValueError(f"--num-images must be >= 1, got {limit}")
    if path.is_dir():
        prompts = _read_folder(path)
    elif not path.is_file():
        raise FileNotFoundError(f"prompt file '{path}': no such file or directory")
    elif path.suffix == ".jsonl":
        prompts = _read_jsonl(path)
    else:
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
        texts = [ln for ln in lines if ln]
        prompts = [GenPrompt(i, str(i), t, {"prompt": t}) for i, t in enumerate(texts)]
    if not prompts:
        raise ValueError(f"prompt file '{path}' holds no prompts")
    seen: dict[str, int] = {}
    for p in prompts:
        if p.id in seen:
            raise ValueError(
                f"prompt file '{path}': id {p.id!r} appears twice (prompts {seen[p.id]} and "
                f"{p.index}); ids must be unique"
            )
        seen[p.id] = p.index
    return prompts[:limit] if limit is not None else prompts


def _read_jsonl(path: Path) -> list[GenPrompt]:
    out = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                data = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not a JSON object ({e})") from e
            text = data.get("prompt") if isinstance(data, dict) else None
            if not isinstance(text, str) or not text.strip():
                raise ValueError(
                    f'{where}: each line must be a JSON object with a "prompt" string, got '
                    f"{line.strip()[:80]}"
                )
            index = len(out)
            pid = data.get("id", index)
            if isinstance(pid, (dict, list, bool)) or pid is None:
                raise ValueError(f'{where}: "id" must be a string or a number, got {pid!r}')
            out.append(GenPrompt(index, str(pid), text, data))
    return out


def _read_folder(path: Path) -> list[GenPrompt]:
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix == ".txt")
    if not files:
        raise ValueError(
            f"prompt folder '{path}' holds no .txt files (expected DPG-Bench's prompts/ folder: "
            "one prompt per <id>.txt)"
        )
    out = []
    for index, file in enumerate(files):
        text = file.read_text(encoding="utf-8").strip()
        if not text:
            raise ValueError(f"prompt file '{file}' is empty")
        out.append(GenPrompt(index, file.stem, text, {"prompt": text}))
    return out
