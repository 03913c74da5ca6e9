"""A local Hugging Face Hub cache built from directories, so that tests load Hub repo ids
through ``huggingface_hub.snapshot_download`` with no network::

    from metamorph_core.testing.hub import offline_hub, populate_hub_cache

    def test_loads_from_the_hub(tmp_path, monkeypatch):
        cache = offline_hub(monkeypatch, tmp_path / "hub")
        populate_hub_cache(cache, "org/name", saved_dir)
        MetaMorphModel.from_pretrained("org/name")

The layout is the Hub cache's: ``CACHE/models--ORG--NAME/blobs/<sha256>``,
``snapshots/<commit>/<path>`` (symlinks to the blobs, or copies) and ``refs/<revision>``
holding the commit hash.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any


def populate_hub_cache(
    cache_dir: str | Path,
    repo_id: str,
    folder: str | Path,
    *,
    revision: str = "main",
    symlinks: bool = True,
) -> str:
    """Put the files under ``folder`` into the Hub cache ``cache_dir`` as the snapshot of
    model repo ``repo_id`` at branch or tag ``revision``; returns the commit hash (derived from
    the files, so the same files give the same commit). ``symlinks``: snapshot files link to
    blobs, as the Hub client writes them on POSIX (else they are copies)."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    if not files:
        raise ValueError(f"'{folder}' holds no files to put into the Hub cache")
    digests = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
    listing = "".join(f"{p.relative_to(folder).as_posix()}\0{digests[p]}\n" for p in files)
    commit = hashlib.sha1(f"{repo_id}\0{listing}".encode()).hexdigest()
    repo = Path(cache_dir) / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    for path in files:
        blob = repo / "blobs" / digests[path]
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            shutil.copyfile(path, blob)
        target = snapshot / path.relative_to(folder)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists() or target.is_symlink():
            target.unlink()
        if symlinks:
            target.symlink_to(os.path.relpath(blob, target.parent))
        else:
            shutil.copyfile(blob, target)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(commit)  # no newline: the client reads it verbatim
    return commit


def offline_hub(monkeypatch: Any, cache_dir: str | Path) -> Path:
    """Make ``cache_dir`` the Hub cache and turn the Hub client offline for one test:
    ``HF_HUB_OFFLINE=1`` and ``HF_HUB_CACHE`` in the environment, and the constants that
    ``huggingface_hub`` read from it when it was imported (``monkeypatch`` undoes both)."""
    from huggingface_hub import constants

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache_dir))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache_dir))
    return cache_dir
