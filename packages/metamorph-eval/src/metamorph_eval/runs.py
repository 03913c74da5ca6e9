"""Evaluation run directories: resumable and reproducible.

A run directory holds ``run.json`` (what the run is: model and its fingerprint, data and its
hash, task and generation settings, seeds, package versions), ``samples.jsonl`` (one line per
finished sample, appended and flushed as each batch finishes) and ``results.json`` (the
metrics, rewritten at the end). Running again into the same directory skips finished samples;
a run whose settings differ from the recorded ones is refused with the differences, as a
training resume is."""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

RUN = "run.json"
SAMPLES = "samples.jsonl"
RESULTS = "results.json"
_PACKAGES = (
    "metamorph-core", "metamorph-encoders", "metamorph-decoders", "metamorph-eval", "torch",
    "transformers", "diffusers",
)  # fmt: skip


class RunMismatchError(ValueError):
    """A rerun with other settings than the run in that directory."""


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(directory: str | Path) -> str:
    """A sha256 over every file of a checkpoint directory (relative path and contents): the
    same weights give the same fingerprint wherever they are. It reads every byte (a minute or
    so for an 8B checkpoint on a fast disk)."""
    root = Path(directory)
    if not root.is_dir():
        raise FileNotFoundError(f"checkpoint '{root}' is not a directory")
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(file_sha256(path).encode())
    return digest.hexdigest()


def versions() -> dict[str, str | None]:
    """The installed versions of the packages that decide the results."""
    out: dict[str, str | None] = {}
    for name in _PACKAGES:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


class RunDir:
    """One run's directory: checks or records ``run.json``, knows the finished samples."""

    def __init__(self, path: str | Path, run: dict[str, Any]) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        run = json.loads(json.dumps(run))  # as JSON stores it
        saved = self.path / RUN
        if saved.is_file():
            before = json.loads(saved.read_text())
            checked = {k: v for k, v in before.items() if k != "versions"}
            now = {k: v for k, v in run.items() if k != "versions"}
            if checked != now:
                diff = {
                    k: (checked.get(k), now.get(k))
                    for k in sorted(set(checked) | set(now))
                    if checked.get(k) != now.get(k)
                }
                raise RunMismatchError(
                    f"'{self.path}' holds an evaluation run with other settings; differences "
                    f"(recorded, now): {diff}. Rerun with the same settings to resume, or pick "
                    "a new --out"
                )
        else:
            tmp = saved.with_suffix(".tmp")
            tmp.write_text(json.dumps(run, indent=2, sort_keys=True) + "\n")
            os.replace(tmp, saved)
        self.run = run

    def samples(self) -> list[dict[str, Any]]:
        """The finished samples, in the order they finished (a line cut short by a kill is
        dropped)."""
        path = self.path / SAMPLES
        if not path.is_file():
            return []
        out = []
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    def append(self, rows: Iterable[dict[str, Any]]) -> None:
        """Append finished samples, flushed to disk before returning."""
        with open(self.path / SAMPLES, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def write_results(self, results: dict[str, Any]) -> Path:
        path = self.path / RESULTS
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=2) + "\n")
        os.replace(tmp, path)
        return path
