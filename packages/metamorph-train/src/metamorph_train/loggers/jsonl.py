"""``jsonl``: plain JSON lines in the run directory, the default logger.

- ``metrics.jsonl``: one row per logged training step, ``{"step": N, "text_loss": ...,
  "text_tokens": ..., "visual_loss": ..., "visual_tokens": ..., "lr": ..., "tokens_per_s":
  ...}`` (the keys follow the objective's terms and units), in the order they were logged.
- ``eval.jsonl``: one row per validation, ``{"step": N, "SOURCE/text_loss": ..., ...}``
  (other namespaces go to ``NAMESPACE.jsonl``).
- ``text.jsonl``: ``{"step", "name", "text"}`` rows (validation samples). Images are not
  written here; validation saves them under ``output_dir/eval/step-N/``.

Resume: when a run starts after step N (``meta["start_step"]``), rows of steps above N (left
by a process killed after its last checkpoint) are dropped first, so no step appears twice
(before, a killed and resumed run repeated those steps). A new run (N = 0) in a directory
that holds rows starts the files afresh.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from metamorph_train.loggers import Logger


class JSONLLogger(Logger):
    """Rows of JSON in ``run_dir`` (see the module docstring for the files)."""

    name = "jsonl"

    def __init__(self, filename: str = "metrics.jsonl") -> None:
        """``filename``: the training rows' file (other namespaces: ``NAMESPACE.jsonl``)."""
        self.filename = filename
        self.dir: Path | None = None
        self.files: dict[str, IO[str]] = {}
        self.start_step = 0

    def start(self, run_dir: Path, config: Mapping[str, Any], meta: Mapping[str, Any]) -> None:
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.start_step = int(meta.get("start_step", 0))

    def _file(self, kind: str) -> IO[str]:
        if self.dir is None:
            raise RuntimeError("JSONLLogger.start was not called")
        if kind not in self.files:
            path = self.dir / (self.filename if kind == "train" else f"{kind}.jsonl")
            drop_rows_after(path, self.start_step)
            self.files[kind] = open(path, "a")  # noqa: SIM115 - closed in finish
        return self.files[kind]

    def _write(self, kind: str, row: dict[str, Any]) -> None:
        f = self._file(kind)
        f.write(json.dumps(row) + "\n")
        f.flush()

    def log_metrics(
        self, step: int, metrics: Mapping[str, float], namespace: str = "train"
    ) -> None:
        self._write(namespace, {"step": step, **metrics})

    def log_text(self, step: int, name: str, text: str) -> None:
        self._write("text", {"step": step, "name": name, "text": text})

    def log_images(self, step: int, name: str, images: Sequence[Any]) -> None:
        pass  # validation writes the PNGs under output_dir/eval/step-N

    def finish(self, success: bool = True) -> None:
        for f in self.files.values():
            f.close()
        self.files.clear()


def drop_rows_after(path: Path, step: int) -> None:
    """Rewrite ``path`` (JSON lines with a ``step``) without the rows above ``step`` and
    without a torn last line; atomic (a kill leaves the old or the new file)."""
    if not path.is_file():
        return
    kept, changed = [], False
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
            keep = int(row["step"]) <= step
        except (ValueError, KeyError, TypeError):
            keep = False
        changed |= not keep
        if keep:
            kept.append(line + "\n")
    if changed:
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)
