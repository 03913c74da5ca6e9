"""Trainer checkpoints: trainable weights, optimizer, scheduler, RNG and data position, in
safetensors + JSON (nothing is pickled), written atomically and pruned to the last K."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from metamorph_core.checkpoint import atomic_directory, write_json
from metamorph_core.errors import CheckpointError

FORMAT = "metamorph-train-state"
STEP_PREFIX = "step-"


def optimizer_tensors(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer state dict (ids or, under FSDP, parameter names as keys) as flat tensors
    plus JSON (param groups, non-tensor state)."""
    tensors, scalars = {}, {}
    for pid, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{pid}::{key}"] = value.detach().contiguous().clone()
            else:
                scalars[f"{pid}::{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`optimizer_tensors`."""
    state: dict[Any, dict[str, Any]] = {}
    for name, value in [*tensors.items(), *meta["scalars"].items()]:
        pid, key = name.split("::", 1)
        state.setdefault(int(pid) if pid.isdigit() else pid, {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    py = random.getstate()
    return tensors, {"python": [py[0], list(py[1]), py[2]]}


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))


def save_train_state(
    directory: Path,
    step: int,
    weights: dict[str, torch.Tensor],
    optim_state: dict[str, Any],
    scheduler: Any,
    data_state: dict[str, Any],
    run: dict[str, Any],
    keep_last: int,
) -> Path:
    """Write ``directory/step-NNNNNNN`` atomically and delete older ones beyond ``keep_last``."""
    path = directory / f"{STEP_PREFIX}{step:07d}"
    with atomic_directory(path, FORMAT) as tmp:
        save_file(
            {k: v.detach().contiguous().clone() for k, v in weights.items()},
            str(tmp / "weights.safetensors"),
        )
        opt_t, opt_meta = optimizer_tensors(optim_state)
        save_file(opt_t, str(tmp / "optimizer.safetensors"))
        rng_t, rng_meta = rng_state()
        save_file(rng_t, str(tmp / "rng.safetensors"))
        write_json(
            tmp / "config.json",
            {
                "format": FORMAT,
                "step": step,
                "run": run,
                "optimizer": opt_meta,
                "scheduler": scheduler.state_dict(),
                "rng": rng_meta,
                "data": data_state,
            },
        )
    steps = sorted(p for p in directory.glob(f"{STEP_PREFIX}*") if (p / "config.json").is_file())
    for old in steps[: max(0, len(steps) - keep_last)]:
        shutil.rmtree(old)
    return path


def latest_checkpoint(directory: Path) -> Path | None:
    """The newest complete checkpoint (temporary directories never count)."""
    steps = sorted(p for p in directory.glob(f"{STEP_PREFIX}*") if (p / "config.json").is_file())
    return steps[-1] if steps else None


def load_train_state(path: Path, run: dict[str, Any]) -> dict[str, Any]:
    """Read a checkpoint, refusing one written for another run configuration."""
    meta = json.loads((path / "config.json").read_text())
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"'{path}' is not a trainer checkpoint")
    if meta["run"] != run:
        diff = {
            k: (meta["run"].get(k), run.get(k))
            for k in set(meta["run"]) | set(run)
            if meta["run"].get(k) != run.get(k)
        }
        raise CheckpointError(
            f"'{path}' was written by another run configuration; differences (checkpoint, now): "
            f"{diff}. Resume with the same recipe or start a new output directory"
        )
    return {
        **meta,
        "weights": load_file(str(path / "weights.safetensors")),
        "optimizer_tensors": load_file(str(path / "optimizer.safetensors")),
        "rng_tensors": load_file(str(path / "rng.safetensors")),
    }
