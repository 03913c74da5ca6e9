"""Sharded trainer checkpoints (FSDP2): every rank writes and reads only its own shards, through
``torch.distributed.checkpoint`` (DCP) and its Hugging Face safetensors storage
(``HuggingFaceStorageWriter`` / ``HuggingFaceStorageReader``).

Layout of ``step-NNNNNNN/``::

    model/shard-RRRRR-model-IIIII-of-NNNNN.safetensors      trainable weights: rank R-1's shards
    optimizer/shard-RRRRR-model-IIIII-of-NNNNN.safetensors  optimizer tensors "<param>::<key>"
    rng.safetensors                                         rank 0's RNG
    config.json                                             written last (train_state)

Nothing is pickled. Each safetensors header records, per tensor, where the shard starts in the
full tensor (``DCP_SHARDING_INFO``, JSON); the reader rebuilds the full shapes and the chunk
map from these headers, so there is no DCP ``.metadata`` file (the default
``FileSystemWriter`` pickles one; the HF writer with ``save_distributed=True`` writes none). The
HF writer stores tensors only (a non-tensor item would go into the file as ``torch.save``
bytes in front of the safetensors data), so the optimizer state is split as in the single-file
layout: its tensors (``exp_avg``, ``exp_avg_sq``, ``step``) go to ``optimizer/``, its param
groups and any non-tensor entries to ``config.json`` (``optimizer``).

The writer serialises one file in memory before writing it, so tensors are grouped into files
of at most ``max(largest tensor, MIN_FILE_BYTES)`` (full-tensor bytes; a rank's part of a file
is its share): during a save a rank holds its shards plus about one tensor's worth of buffer.
Reading copies slice by slice into the tensors being loaded.

Atomicity: every rank writes into the temporary sibling ``.step-NNNNNNN.tmp-sharded`` (a
filesystem every rank sees is assumed, as DCP assumes); after DCP's final collective rank 0
writes ``rng.safetensors`` and then ``config.json``, fsyncs and renames the directory. A save
cut short leaves only the temporary directory, which never counts as a checkpoint and is
removed when a run starts.

Resharding: DCP maps the stored chunks onto whatever the loading process holds, so a
checkpoint written by N ranks loads on M ranks under FSDP2, or into a whole model in one
process.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from metamorph_core.checkpoint import is_checkpoint, write_json
from metamorph_core.errors import CheckpointError
from metamorph_train import distributed
from metamorph_train.train_state import (
    FORMAT,
    SHARDED,
    optimizer_state,
    optimizer_tensors,
    prune,
    step_path,
    write_rng,
)

MODEL, OPTIMIZER = "model", "optimizer"
TMP_SUFFIX = ".tmp-sharded"
MIN_FILE_BYTES = 32 * 2**20


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _barrier() -> None:
    if _distributed() and dist.get_world_size() > 1:
        dist.barrier()


def file_plan(state: dict[str, torch.Tensor], min_bytes: int = MIN_FILE_BYTES) -> dict[str, int]:
    """File index (from 1) of each tensor of ``state``: in name order, files of at most
    ``max(largest tensor, min_bytes)`` bytes of full tensors. Depends on names and full shapes
    only, so every rank computes the same plan."""
    sizes = {k: v.numel() * v.element_size() for k, v in state.items()}
    cap = max([min_bytes, *sizes.values()])
    plan, index, used = {}, 1, 0
    for name in sorted(state):
        if used and used + sizes[name] > cap:
            index, used = index + 1, 0
        plan[name] = index
        used += sizes[name]
    return plan


def write_tensors(state: dict[str, torch.Tensor], directory: Path) -> None:
    """Save ``state`` (tensors only; DTensors as this rank's shards) into ``directory`` as
    safetensors files; a collective when a process group is up."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    directory.mkdir(parents=True, exist_ok=True)
    if not state:
        return
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise TypeError(f"only tensors can be stored in safetensors shards, not {bad[:5]}")
    writer = HuggingFaceStorageWriter(
        str(directory), fqn_to_index_mapping=file_plan(state), save_distributed=True
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        dcp.save(state, storage_writer=writer, no_dist=not _distributed())


def stored_tensors(directory: Path) -> dict[str, Any]:
    """Name -> DCP ``TensorStorageMetadata`` (full ``size``, ``properties.dtype``) of the
    tensors stored in ``directory``, read from the safetensors headers."""
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    if not directory.is_dir():
        raise CheckpointError(
            f"'{directory}' is missing: not a sharded trainer checkpoint, or one cut short"
        )
    return HuggingFaceStorageReader(str(directory)).read_metadata().state_dict_metadata


def read_tensors(
    state: dict[str, torch.Tensor], directory: Path, what: str, collective: bool = True
) -> None:
    """Load ``directory``'s tensors into ``state``'s tensors in place (DTensors: each rank its
    own shards). ``collective``: every rank of the process group calls this together; ``False``
    reads alone (one process, e.g. rank 0 exporting)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    stored = stored_tensors(directory)
    missing = sorted(set(state) - set(stored))
    if missing:
        raise CheckpointError(
            f"'{directory}' lacks {what} {missing[:5]} ({len(missing)} in all) that the model "
            "being loaded has; load it into the model (recipe) that wrote it"
        )
    for name, tensor in state.items():
        if tuple(stored[name].size) != tuple(tensor.shape):
            raise CheckpointError(
                f"'{directory}': {what} '{name}' has shape {tuple(stored[name].size)} there but "
                f"{tuple(tensor.shape)} in the model being loaded; use the recipe that wrote it"
            )
    reader = HuggingFaceStorageReader(str(directory))
    alone = not (collective and _distributed())
    with warnings.catch_warnings():  # DCP warns whenever it loads in one process, even asked to
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        dcp.load(state, storage_reader=reader, no_dist=alone)


def save_sharded(
    directory: Path,
    step: int,
    model: Any,
    optimizer: torch.optim.Optimizer,
    names: list[str],
    config: dict[str, Any],
    keep_last: int,
) -> Path:
    """Write ``directory/step-NNNNNNN`` in the sharded layout and prune to ``keep_last``; a
    collective every rank calls. ``config``: ``config.json`` less ``optimizer`` and ``rng``
    (:func:`metamorph_train.train_state.state_config`)."""
    path = step_path(directory, step)
    tmp = directory / f".{path.name}{TMP_SUFFIX}"
    rank0 = not _distributed() or dist.get_rank() == 0
    _check_target(path)  # every rank, so that all fail together (one filesystem)
    if rank0:
        if tmp.exists():  # a save of this step cut short
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    _barrier()  # the temporary directory exists, empty
    write_tensors(distributed.sharded_weights(model, names), tmp / MODEL)
    state = distributed.sharded_optimizer_state(model, optimizer)
    tensors, optim_meta = optimizer_tensors(state, copy=False)
    write_tensors(tensors, tmp / OPTIMIZER)
    del state, tensors
    if rank0:  # DCP's save ended with a collective: every rank's files are written
        _publish(tmp, path, {**config, "layout": SHARDED, "optimizer": optim_meta, "rng": None})
        prune(directory, keep_last)
    _barrier()  # nobody moves on before the checkpoint is in place
    return path


def _check_target(path: Path) -> None:
    if path.exists() and not (
        path.is_dir() and (not any(path.iterdir()) or is_checkpoint(path, FORMAT))
    ):
        raise CheckpointError(
            f"refusing to save into '{path}': it exists and is not a trainer checkpoint; move "
            "it away or use another output directory"
        )


def _fsync(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _publish(tmp: Path, path: Path, config: dict[str, Any]) -> None:
    """Rank 0: the RNG, then ``config.json`` (last), then ``tmp`` renamed to ``path``."""
    config["rng"] = write_rng(tmp)
    write_json(tmp / "config.json", config)
    for name in ("rng.safetensors", "config.json"):
        _fsync(tmp / name)
    old = None
    if path.exists():
        old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
        path.rename(old)
    tmp.rename(path)
    _fsync(path.parent)
    if old is not None:
        shutil.rmtree(old)


def load_sharded(
    path: Path,
    model: Any,
    optimizer: torch.optim.Optimizer,
    names: list[str],
    meta: dict[str, Any],
) -> None:
    """Load the weights ``names`` and the optimizer state of the sharded checkpoint ``path``
    (its ``config.json`` read as ``meta``) into ``model`` and ``optimizer`` as they are
    sharded now (FSDP2 on any number of ranks, or a whole model in one process); a collective
    when a process group is up."""
    weights = distributed.sharded_weights(model, names)
    read_tensors(weights, path / MODEL, "weights")
    distributed.set_sharded_weights(model, weights)
    del weights
    template = distributed.sharded_optimizer_state(model, optimizer)
    tensors, _ = optimizer_tensors(template, copy=False)
    read_tensors(tensors, path / OPTIMIZER, "optimizer state")
    distributed.set_sharded_optimizer_state(
        model, optimizer, optimizer_state(tensors, meta["optimizer"])
    )


def load_weights_only(path: Path, module: torch.nn.Module, names: list[str]) -> None:
    """Load the weights ``names`` of the sharded checkpoint ``path`` into the whole (unsharded)
    ``module`` in this process alone, slice by slice; the optimizer state is not read."""
    params = dict(module.named_parameters())
    state = {n: params[n].detach() for n in names}
    read_tensors(state, path / MODEL, "weights", collective=False)


def read_full_weights(path: Path) -> dict[str, torch.Tensor]:
    """Every stored weight of the sharded checkpoint ``path`` as a full tensor, in this process
    alone (for checks and tools; a model's worth of memory)."""
    stored = stored_tensors(path / MODEL)
    state = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype) for k, m in stored.items()}
    read_tensors(state, path / MODEL, "weights", collective=False)
    return state
