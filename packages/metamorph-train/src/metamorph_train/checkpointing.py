"""The trainer's checkpoint save and resume, in either layout (:mod:`metamorph_train.train_state`):
sharded under FSDP2 (``train.fsdp_checkpoint: sharded``, the default; every rank writes its
shards, :mod:`metamorph_train.sharded_checkpoint`), single-file otherwise (rank 0 writes full
tensors, gathered first under FSDP2 with ``fsdp_checkpoint: full``).

Resuming reads either layout whatever the run's own: a sharded checkpoint loads resharded onto
any number of FSDP2 ranks or into one process; a single-file one loads everywhere. The data
position and the RNG are the run's, not a rank's: every rank draws the same global batch from
the shared mixture generator and keeps its share, and rank 0's RNG is the one saved and
restored on every rank. So a run may resume on another number of ranks when the global batch
(``batch_size`` x ranks) stays the same.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file

from metamorph_core.checkpoint import jsonable
from metamorph_core.errors import CheckpointError
from metamorph_train import distributed
from metamorph_train.sharded_checkpoint import (
    load_sharded,
    load_weights_only,
    read_full_weights,
    save_sharded,
)
from metamorph_train.train_state import (
    EMA_FILE,
    FORMAT,
    SHARDED,
    SINGLE_FILE,
    latest_checkpoint,
    load_train_state,
    optimizer_state,
    read_checkpoint_config,
    restore_rng,
    save_train_state,
    state_config,
    step_path,
)

FSDP_CHECKPOINTS = ("sharded", "full")


class CheckpointedTrainer(Protocol):
    """What of a :class:`~metamorph_train.trainer.Trainer` checkpointing reads."""

    model: torch.nn.Module
    params: dict[str, torch.nn.Parameter]
    strategy: str | None
    rank: int
    world: int
    out: Path
    config: Any  # TrainerConfig
    data: Any  # Mixture
    loader: Any  # metamorph_train.data.loader.Loader
    log: Callable[[str], None] | None
    # ``ema``: a metamorph_train.ema.WeightAverage, or None (read with getattr: a trainer
    # without the attribute keeps no average)

    def _run_signature(self) -> dict[str, Any]: ...


def is_sharded(trainer: CheckpointedTrainer) -> bool:
    """Whether ``trainer`` writes sharded checkpoints (FSDP2 under torchrun and
    ``train.fsdp_checkpoint: sharded``)."""
    choice = trainer.config.fsdp_checkpoint
    if choice not in FSDP_CHECKPOINTS:
        raise ValueError(
            f"train.fsdp_checkpoint is '{choice}'; use 'sharded' (every rank writes its shards) "
            "or 'full' (weights gathered onto rank 0, one file)"
        )
    return trainer.strategy == "fsdp" and choice == "sharded"


def _barrier(trainer: CheckpointedTrainer) -> None:
    if trainer.world > 1:
        dist.barrier()


def begin(
    trainer: CheckpointedTrainer,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    resume: bool = True,
) -> int:
    """Remove saves cut short (rank 0), then, when ``resume``, load the newest complete
    checkpoint of ``trainer.out`` into the model, optimizer, scheduler, data position and RNG
    (every rank). Returns the step it was saved at (0 when none is loaded). Refuses another
    run's checkpoint (:func:`~metamorph_train.train_state.read_checkpoint_config`)."""
    is_sharded(trainer)  # an unknown train.fsdp_checkpoint fails before the first step
    if trainer.rank == 0:
        for stale in trainer.out.glob(".step-*.tmp-*"):  # a save cut short by a kill
            shutil.rmtree(stale, ignore_errors=True)
    _barrier(trainer)
    latest = latest_checkpoint(trainer.out) if resume else None
    if latest is None:
        return 0
    meta = read_checkpoint_config(latest, trainer._run_signature(), trainer.world)
    names = sorted(trainer.params)
    if meta.get("layout", SINGLE_FILE) == SHARDED:
        load_sharded(latest, trainer.model, optimizer, names, meta)
    else:
        state = load_train_state(latest, trainer._run_signature(), trainer.world)
        missing = set(names) - set(state["weights"])
        if missing:
            raise ValueError(f"checkpoint '{latest}' lacks weights {sorted(missing)[:5]}")
        distributed.load_weights(trainer.model, state["weights"], trainer.strategy)
        optim = optimizer_state(state["optimizer_tensors"], state["optimizer"])
        distributed.load_optimizer_state(trainer.model, optimizer, optim, trainer.strategy)
        ema = getattr(trainer, "ema", None)
        if ema is not None:
            if state["ema_tensors"] is None:
                raise CheckpointError(
                    f"'{latest}' has no weight averages ({EMA_FILE}) for train.ema_decay; "
                    "resume with the recipe that wrote it or start a new output directory"
                )
            ema.load_state_dict(state["ema_tensors"], str(latest))
    scheduler.load_state_dict(meta["scheduler"])
    trainer.loader.load_state_dict(meta["data"])
    restore_rng(latest, meta)
    if trainer.log:
        trainer.log(f"resumed from {latest} at step {meta['step']}")
    return int(meta["step"])


def save(
    trainer: CheckpointedTrainer, step: int, optimizer: torch.optim.Optimizer, scheduler: Any
) -> Path:
    """Write the checkpoint of ``step`` (every rank calls this; atomic; the last
    ``train.keep_last`` kept)."""
    c = trainer.config
    names = sorted(trainer.params)
    if is_sharded(trainer):
        config = state_config(
            step,
            trainer._run_signature(),
            scheduler,
            trainer.loader.state_dict(),
            trainer.world,
            SHARDED,
        )
        return save_sharded(trainer.out, step, trainer.model, optimizer, names, config, c.keep_last)
    # full tensors (a collective under FSDP); rank 0 writes them
    ema = getattr(trainer, "ema", None)
    weights = distributed.full_weights(trainer.model, names, trainer.strategy)
    optim = distributed.full_optimizer_state(trainer.model, optimizer, trainer.strategy)
    path = step_path(trainer.out, step)
    if trainer.rank == 0:
        path = save_train_state(
            trainer.out,
            step,
            weights,
            optim,
            scheduler,
            trainer.loader.state_dict(),
            trainer._run_signature(),
            c.keep_last,
            trainer.world,
            ema=ema.state_dict() if ema is not None else None,
        )
    del weights, optim
    _barrier(trainer)
    return path


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The full trainable weights of the trainer checkpoint ``path`` (either layout), read in
    this process alone."""
    path = Path(path)
    if (path / "weights.safetensors").is_file():
        return load_file(str(path / "weights.safetensors"))
    return read_full_weights(path)


def load_trained_weights(path: str | Path, objective: Any) -> dict[str, Any]:
    """Load the trained weights of the checkpoint ``path`` (either layout) into the whole,
    unsharded model of ``objective`` (as the recipe that trained it builds it), in this process
    alone, a tensor (or a shard's slice) at a time; the optimizer state is not read. Refuses a
    checkpoint whose objective options or trained parameters differ from ``objective``'s. A
    checkpoint of a run with ``train.ema_decay`` gives its weight averages, as the run's
    ``final`` does. Returns its ``config.json`` (``layout`` filled in; ``averaged``: whether the
    averages were loaded)."""
    path = Path(path)
    meta = json.loads((path / "config.json").read_text())
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"'{path}' is not a trainer checkpoint (format {FORMAT})")
    module = objective.module
    names = sorted(n for n, p in module.named_parameters() if objective.trainable(n, p))
    run = meta["run"]
    signature = jsonable(objective.signature())
    changed = {k: (run.get(k), v) for k, v in signature.items() if run.get(k) != v}
    if changed or run.get("params") != names:
        stored = set(run.get("params", []))
        raise CheckpointError(
            f"'{path}' was not trained with this recipe: options (checkpoint, recipe) {changed}; "
            f"trained parameters only in the checkpoint {sorted(stored - set(names))[:5]}, only "
            f"in the recipe's model {sorted(set(names) - stored)[:5]}. Pass the recipe the run "
            "was trained with"
        )
    meta["layout"] = meta.get("layout", SINGLE_FILE)
    meta["averaged"] = False
    with torch.no_grad():
        if meta["layout"] == SHARDED:
            load_weights_only(path, module, names)
        else:
            params = dict(module.named_parameters())
            averaged = (path / EMA_FILE).is_file()  # a run with train.ema_decay: its averages
            source = path / (EMA_FILE if averaged else "weights.safetensors")
            with safe_open(str(source), framework="pt") as f:
                for name in names:
                    params[name].copy_(f.get_tensor(name))
            meta["averaged"] = averaged
    return meta
