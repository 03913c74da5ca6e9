"""Task functions of the local lmms-eval tasks in ``test_lmms.py``. The test copies this file
next to the task YAML files it writes, which name these functions as
``!function lmms_task_utils.NAME``; the records are metamorph-eval's JSONL layout
(:mod:`metamorph_eval.records`) with their images under ``images/`` beside the file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image

from metamorph_eval import scoring
from metamorph_eval.records import LETTERS

IMAGE_ROOT = Path(__file__).resolve().parent / "images"


def doc_to_visual(doc: dict[str, Any]) -> list[Any]:
    """The record's images (``images``, paths under ``images/``) as RGB PIL images."""
    out = []
    for path in doc.get("images") or []:
        with Image.open(IMAGE_ROOT / path) as img:
            out.append(img.convert("RGB"))
    return out


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """Exact match scored as ``metamorph eval understanding``'s ``exact-match`` task does."""
    return {"accuracy": scoring.exact_match(results[0], [doc["answer"]])}


def answer_index(doc: dict[str, Any]) -> int:
    """A multiple-choice record's answer letter as the index of its option."""
    return LETTERS.index(doc["answer"])
