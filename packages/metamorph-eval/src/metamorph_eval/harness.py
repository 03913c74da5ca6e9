"""Running an understanding task on a unified model: batched greedy generation, every answer
scored and appended to ``samples.jsonl`` as its batch finishes, ``results.json`` at the end
(see :mod:`metamorph_eval.runs` for resuming)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from metamorph_eval.records import EvalRecord
from metamorph_eval.runs import RunDir, fingerprint, versions
from metamorph_eval.tasks import EvalSample, EvalTask


def evaluate_understanding(
    model: Any,
    task: EvalTask,
    records: Sequence[EvalRecord],
    out: str | Path,
    *,
    image_root: str | Path | None = None,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    on_error: str = "raise",
    model_id: dict[str, Any] | None = None,
    data_id: dict[str, Any] | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Ask ``model`` (a :class:`~metamorph_core.MetaMorphModel`) every sample of ``task`` over
    ``records`` in batches of ``batch_size`` (greedy, up to ``max_new_tokens``, the task's
    default when ``None``), score, and write ``out/samples.jsonl`` and ``out/results.json``;
    returns the results. Samples already in ``out/samples.jsonl`` are skipped (resume); a
    sample whose image cannot be read raises, or with ``on_error="skip"`` is counted in
    ``results["skipped"]``. ``model_id`` / ``data_id`` identify the checkpoint and data in
    ``run.json`` (the command passes path and fingerprint)."""
    from metamorph_core.conversation import Conversation, Turn
    from metamorph_core.vision import ImageRoot

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    budget = max_new_tokens or task.max_new_tokens
    run = RunDir(
        out,
        {
            "kind": "understanding",
            "model": model_id or {},
            "data": data_id or {},
            "task": task.settings(),
            "generation": {"do_sample": False, "max_new_tokens": budget},
            "versions": versions(),
        },
    )
    samples = [s for r in records for s in task.samples(r)]
    done = {row["id"] for row in run.samples()}
    todo = [s for s in samples if s.id not in done]
    root = ImageRoot(image_root) if image_root is not None else None
    skipped: dict[str, int] = {}
    began = time.perf_counter()
    bar = None
    if progress and log is not None:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(samples), initial=len(samples) - len(todo), desc=task.name)
    try:
        for start in range(0, len(todo), batch_size):
            batch, convs = [], []
            for sample in todo[start : start + batch_size]:
                try:
                    images = [_load(root, p, sample) for p in sample.images]
                except (OSError, ValueError):
                    if on_error == "raise":
                        raise
                    skipped["bad_images"] = skipped.get("bad_images", 0) + 1
                    continue
                batch.append(sample)
                convs.append(Conversation([Turn("user", sample.prompt)], images, id=sample.id))
            if not batch:
                continue
            results = model.generate(convs, max_new_tokens=budget)
            run.append(_row(task, s, r.text) for s, r in zip(batch, results, strict=True))
            if bar is not None:
                bar.update(len(batch))
    finally:
        if bar is not None:
            bar.close()
    asked = {s.id for s in samples}
    scored = [row for row in run.samples() if row["id"] in asked]
    results = {
        "task": task.name,
        "metrics": task.aggregate(scored),
        "samples": len(scored),
        "skipped": skipped,
        "seconds": round(time.perf_counter() - began, 2),
    }
    run.write_results(results)
    if log is not None:
        acc = results["metrics"].get("accuracy", {})
        log(f"{task.name}: accuracy {acc.get('value')} over {acc.get('n')} ({run.path})")
    return results


def _load(root: Any, path: str, sample: EvalSample) -> Any:
    if root is None:
        raise ValueError(f"record {sample.record.id!r} names images but no --image-root is set")
    return root.load(path, sample.record.id)


def _row(task: EvalTask, sample: EvalSample, output: str) -> dict[str, Any]:
    return {
        "id": sample.id,
        "record_id": sample.record.id,
        "category": sample.record.category,
        "prompt": sample.prompt,
        "output": output,
        "answers": sample.answers,
        **task.score(sample, output),
    }


def model_identity(path: str | Path) -> dict[str, Any]:
    """``{"path", "fingerprint"}`` of a checkpoint directory for ``run.json``."""
    return {"path": str(path), "fingerprint": fingerprint(path)}
