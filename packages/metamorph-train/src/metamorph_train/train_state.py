"""Trainer checkpoints: trainable weights, optimizer, scheduler, RNG and data position, in
safetensors + JSON (nothing is pickled), written atomically and pruned to the last K.

A checkpoint is a directory ``step-NNNNNNN`` whose ``config.json`` (written last) holds the
format, the step, the run signature, the world size that wrote it, the layout, the optimizer's
non-tensor state, the scheduler, the RNG's JSON part and the data position. Two layouts:

- ``single-file`` (DDP, one process, FSDP2 with ``train.fsdp_checkpoint=full``; checkpoints
  without a ``layout`` key): ``weights.safetensors`` (full trainable weights),
  ``optimizer.safetensors``, ``rng.safetensors``, written by rank 0 (:func:`save_train_state`);
- ``sharded`` (FSDP2): every rank writes its shards, see
  :mod:`metamorph_train.sharded_checkpoint`.

A directory without ``config.json`` is never a checkpoint (:func:`latest_checkpoint`).
"""

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
SINGLE_FILE, SHARDED = "single-file", "sharded"
# trainer settings that change how a checkpoint is stored, not what is trained: a run may resume
# a checkpoint whatever they were
STORAGE_KEYS = ("fsdp_checkpoint",)
GLOBAL_BATCH = "global batch (batch_size x ranks)"
EMA_FILE = "ema.safetensors"  # the weight averages of a run with train.ema_decay


def optimizer_tensors(
    state: dict[str, Any], copy: bool = True
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer state dict (ids or, through ``get_optimizer_state_dict``, parameter names
    as keys) as flat tensors ``"<param>::<key>"`` plus JSON (param groups, non-tensor state).
    ``copy=False`` returns the state's own tensors (under FSDP2 its DTensor shards)."""
    tensors, scalars = {}, {}
    for pid, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{pid}::{key}"] = (
                    value.detach().contiguous().clone() if copy else value.detach()
                )
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


def write_rng(directory: Path) -> dict[str, Any]:
    """Write this process's RNG state to ``directory/rng.safetensors``; returns its JSON part
    (for ``config.json``'s ``rng``)."""
    tensors, meta = rng_state()
    save_file(tensors, str(directory / "rng.safetensors"))
    return meta


def restore_rng(path: Path, meta: dict[str, Any]) -> None:
    """Set the RNG state a checkpoint (``path``, its ``config.json`` read as ``meta``) saved."""
    set_rng_state(load_file(str(path / "rng.safetensors")), meta["rng"])


def step_path(directory: Path, step: int) -> Path:
    return directory / f"{STEP_PREFIX}{step:07d}"


def save_train_state(
    directory: Path,
    step: int,
    weights: dict[str, torch.Tensor],
    optim_state: dict[str, Any],
    scheduler: Any,
    data_state: dict[str, Any],
    run: dict[str, Any],
    keep_last: int,
    world: int = 1,
    ema: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``directory/step-NNNNNNN`` (single-file layout) atomically and delete older ones
    beyond ``keep_last``. ``world``: how many ranks trained (a resumed run may use another
    number with the same global batch). ``ema``: the weight averages
    (:class:`~metamorph_train.ema.WeightAverage`), written to ``ema.safetensors``."""
    path = step_path(directory, step)
    with atomic_directory(path, FORMAT) as tmp:
        save_file(
            {k: v.detach().contiguous().clone() for k, v in weights.items()},
            str(tmp / "weights.safetensors"),
        )
        opt_t, opt_meta = optimizer_tensors(optim_state)
        save_file(opt_t, str(tmp / "optimizer.safetensors"))
        if ema is not None:
            save_file({k: v.contiguous() for k, v in ema.items()}, str(tmp / EMA_FILE))
        rng_meta = write_rng(tmp)
        write_json(
            tmp / "config.json",
            {
                **state_config(step, run, scheduler, data_state, world, SINGLE_FILE),
                "optimizer": opt_meta,
                "rng": rng_meta,
            },
        )
    prune(directory, keep_last)
    return path


def state_config(
    step: int,
    run: dict[str, Any],
    scheduler: Any,
    data_state: dict[str, Any],
    world: int,
    layout: str,
) -> dict[str, Any]:
    """``config.json`` of a checkpoint, less its ``optimizer`` and ``rng`` parts."""
    return {
        "format": FORMAT,
        "layout": layout,
        "step": step,
        "world": world,
        "run": run,
        "scheduler": scheduler.state_dict(),
        "data": data_state,
    }


def prune(directory: Path, keep_last: int) -> None:
    """Delete complete checkpoints in ``directory`` beyond the newest ``keep_last``."""
    steps = sorted(p for p in directory.glob(f"{STEP_PREFIX}*") if (p / "config.json").is_file())
    for old in steps[: max(0, len(steps) - keep_last)]:
        shutil.rmtree(old)


def latest_checkpoint(directory: Path) -> Path | None:
    """The newest complete checkpoint (temporary directories never count)."""
    steps = sorted(p for p in directory.glob(f"{STEP_PREFIX}*") if (p / "config.json").is_file())
    return steps[-1] if steps else None


def _comparable(run: dict[str, Any], world: int | None) -> dict[str, Any]:
    """``run`` as resuming compares it: storage settings left out, and with ``world`` known the
    per-rank batch size replaced by the global batch (what the data and the losses depend on)."""
    out = {k: v for k, v in run.items() if k not in STORAGE_KEYS}
    if world is not None and "batch_size" in out:
        out[GLOBAL_BATCH] = out.pop("batch_size") * world
    return out


def read_checkpoint_config(path: Path, run: dict[str, Any], world: int | None) -> dict[str, Any]:
    """``path/config.json``, refusing a checkpoint of another format or run configuration.
    A checkpoint that records its world size resumes on ``world`` ranks when the global batch
    (``batch_size`` x ranks) matches; one that does not, only with the same ``batch_size``."""
    meta = json.loads((path / "config.json").read_text())
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"'{path}' is not a trainer checkpoint")
    saved_world = meta.get("world")
    saved = _comparable(meta["run"], saved_world)
    now = _comparable(run, world if saved_world is not None else None)
    if saved != now:
        diff = {
            k: (saved.get(k), now.get(k))
            for k in set(saved) | set(now)
            if saved.get(k) != now.get(k)
        }
        raise CheckpointError(
            f"'{path}' was written by another run configuration; differences (checkpoint, now): "
            f"{diff}. Resume with the same recipe or start a new output directory"
        )
    return meta


def load_train_state(path: Path, run: dict[str, Any], world: int | None = None) -> dict[str, Any]:
    """Read a single-file checkpoint, refusing one written for another run configuration
    (:func:`read_checkpoint_config`)."""
    meta = read_checkpoint_config(path, run, world)
    if meta.get("layout", SINGLE_FILE) != SINGLE_FILE:
        raise CheckpointError(
            f"'{path}' is a {meta['layout']} checkpoint; load it with "
            "metamorph_train.sharded_checkpoint.load_sharded"
        )
    return {
        **meta,
        "weights": load_file(str(path / "weights.safetensors")),
        "optimizer_tensors": load_file(str(path / "optimizer.safetensors")),
        "rng_tensors": load_file(str(path / "rng.safetensors")),
        "ema_tensors": load_file(str(path / EMA_FILE)) if (path / EMA_FILE).is_file() else None,
    }
