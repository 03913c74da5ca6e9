"""What a run directory records about how it was made: ``recipe.yaml`` (the resolved recipe,
overrides applied and defaults filled in) and ``run_info.json`` (package versions, the git
commit of the working directory, Python, start time and step, world size). Both are
rewritten at every start of the run (a resumed run may raise ``train.steps``); the earlier
starts' information is kept in ``run_info.json``'s ``previous`` list.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

#: distributions whose versions a run records
PACKAGES = (
    "metamorph-core",
    "metamorph-encoders",
    "metamorph-decoders",
    "metamorph-train",
    "metamorph-eval",
    "metamorph-toy",
    "torch",
    "transformers",
    "diffusers",
    "peft",
    "timm",
    "safetensors",
)


def versions(packages: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """Installed version of each distribution in ``packages`` (``None``: not installed)."""
    out: dict[str, str | None] = {}
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _git(*args: str, cwd: Path) -> str | None:
    try:
        done = subprocess.run(
            ["git", "--no-optional-locks", *args],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def git_state(cwd: str | Path | None = None) -> dict[str, Any]:
    """``{"git_commit": HEAD's hash or None, "git_dirty": tracked files changed or None}`` of
    the git work tree holding ``cwd`` (default: the current directory); read-only."""
    where = Path(cwd or os.getcwd())
    head = _git("rev-parse", "HEAD", cwd=where)
    if head is None:
        return {"git_commit": None, "git_dirty": None}
    status = _git("status", "--porcelain", "--untracked-files=no", cwd=where)
    return {
        "git_commit": head.strip(),
        "git_dirty": None if status is None else bool(status.strip()),
    }


def run_info(start_step: int, world_size: int = 1) -> dict[str, Any]:
    """The information of this start of a run (the ``meta`` loggers receive)."""
    return {
        "versions": versions(),
        **git_state(),
        "python": platform.python_version(),
        "argv": list(sys.argv),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "start_step": int(start_step),
        "world_size": int(world_size),
    }


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_run_files(
    run_dir: str | Path, recipe: Mapping[str, Any] | None, info: Mapping[str, Any]
) -> None:
    """Write ``run_dir/recipe.yaml`` (when ``recipe`` is given) and ``run_dir/run_info.json``
    (``info`` with the earlier starts' information under ``previous``)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if recipe is not None:
        _atomic_write(run_dir / "recipe.yaml", yaml.safe_dump(dict(recipe), sort_keys=False))
    path = run_dir / "run_info.json"
    previous: list[Any] = []
    if path.is_file():
        try:
            old = json.loads(path.read_text())
            previous = [*old.pop("previous", []), old]
        except (ValueError, AttributeError):
            previous = []
    _atomic_write(path, json.dumps({**info, "previous": previous}, indent=2) + "\n")
