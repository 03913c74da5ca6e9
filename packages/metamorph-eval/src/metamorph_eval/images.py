"""Image tasks: benchmarks that score each *generated* image on its own (a judge model, a
detector, a classifier), as plugins of kind ``eval_task`` beside the understanding tasks.
Dataset-level generation metrics (Fréchet distance, CLIP score) are in
:mod:`metamorph_eval.generation`.

Records are JSONL, one prompt a line: ``{"id", "prompt", "response_prefix" (optional: the
answer's words before the image; default the model's ``image_answer_prefix``), ...}``; the
rest is the task's (what the image should show). :func:`evaluate_images` generates one image
per record (batched; each decoded alone with a seed derived from the run's seed and the
record's position, so pixels do not depend on the batch), saves it as
``OUT/images/<id>.png``, scores it, and appends the row to ``samples.jsonl`` (resumable, as
:mod:`metamorph_eval.runs` describes)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from metamorph_eval import stats
from metamorph_eval.records import RecordError
from metamorph_eval.runs import RunDir, versions


@dataclass
class PromptRecord:
    """One generation prompt and what its image should show (``meta``)."""

    id: str
    prompt: str
    response_prefix: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def read_prompts(path: str | Path) -> list[PromptRecord]:
    """The prompt records of a JSONL file; a bad line is a :class:`RecordError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file '{path}' not found")
    out, seen = [], set()
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            data = json.loads(line)
        except json.JSONDecodeError as e:
            raise RecordError(f"{where}: not JSON ({e})") from e
        if not isinstance(data, dict) or "id" not in data or "prompt" not in data:
            raise RecordError(f"{where}: a prompt record needs 'id' and 'prompt'")
        rid = str(data["id"])
        if rid in seen:
            raise RecordError(f"{where}: id {rid!r} repeats")
        seen.add(rid)
        meta = {k: v for k, v in data.items() if k not in ("id", "prompt", "response_prefix")}
        out.append(PromptRecord(rid, str(data["prompt"]), data.get("response_prefix"), meta))
    if not out:
        raise RecordError(f"'{path}' holds no prompts")
    return out


class ImageTask:
    """A task that scores generated images one by one. Subclasses set ``name`` and implement
    :meth:`score_image`."""

    name: ClassVar[str] = ""

    def settings(self) -> dict[str, Any]:
        """What a resumed run must share with the one it continues."""
        return {"task": self.name}

    def score_image(self, record: PromptRecord, pixels: Any) -> dict[str, Any]:
        """``{"score": float in [0, 1], ...}`` of ``pixels`` ``(3, h, w)`` in [0, 1]."""
        raise NotImplementedError

    def aggregate(self, scored: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return {"accuracy": stats.accuracy([s["score"] for s in scored])}


def evaluate_images(
    model: Any,
    task: ImageTask,
    records: Sequence[PromptRecord],
    out: str | Path,
    *,
    batch_size: int = 8,
    seed: int = 0,
    decoding: dict[str, Any] | None = None,
    model_id: dict[str, Any] | None = None,
    data_id: dict[str, Any] | None = None,
    decoder: str | None = None,
    log: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Generate, decode and score an image per record (see the module docstring); returns
    the results also written to ``out/results.json``. ``decoder``: where an attached decoder
    came from (recorded). ``decoding``: fields of the decoder's
    :class:`~metamorph_core.decoding.DecodeConfig` over its own default sampling (``seed`` is
    set per image)."""
    import torch

    from metamorph_core.generation import to_pil

    decoding = dict(decoding or {})
    if "seed" in decoding:
        raise ValueError("the decoder's seed is set per image from seed=; drop it from decoding")
    run = RunDir(
        out,
        {
            "kind": "images",
            "model": model_id or {},
            "decoder": decoder,
            "data": data_id or {},
            "task": task.settings(),
            "generation": {"do_sample": False, "seed": seed, "decoding": decoding},
            "versions": versions(),
        },
    )
    model.require_decoder()
    images = run.path / "images"
    images.mkdir(exist_ok=True)
    position = {r.id: k for k, r in enumerate(records)}
    done = {row["id"] for row in run.samples()}
    todo = [r for r in records if r.id not in done]
    began = time.perf_counter()
    for start in range(0, len(todo), batch_size):
        batch = todo[start : start + batch_size]
        prefixes = [
            model.image_answer_prefix if r.response_prefix is None else r.response_prefix
            for r in batch
        ]
        results = model.generate_image([r.prompt for r in batch], response_prefix=prefixes)
        rows = []
        for record, result in zip(batch, results, strict=True):
            image_seed = (seed * 1_000_003 + position[record.id]) % (2**31)
            with torch.no_grad():
                pixels = model.decode_images(
                    result.images[0][None], None, **decoding, seed=image_seed
                )[0]
            to_pil(pixels).save(images / f"{record.id}.png")
            rows.append(
                {"id": record.id, "prompt": record.prompt, **task.score_image(record, pixels)}
            )
        run.append(rows)
    asked = set(position)
    scored = [row for row in run.samples() if row["id"] in asked]
    results = {
        "task": task.name,
        "metrics": task.aggregate(scored),
        "samples": len(scored),
        "seconds": round(time.perf_counter() - began, 2),
    }
    run.write_results(results)
    if log is not None:
        acc = results["metrics"].get("accuracy", {})
        log(f"{task.name}: accuracy {acc.get('value')} over {acc.get('n')} ({run.path})")
    return results
