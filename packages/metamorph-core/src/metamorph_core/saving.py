"""Saving and loading unified models: a checkpoint directory holds ``config.json`` (format,
library version, the :class:`~metamorph_core.config.MetaMorphConfig`, each component's
registry name and kwargs, the image token ids), ``model.safetensors`` (every component that
does not save itself) and a subfolder per component that does (``backbone/`` in plain
transformers format, loadable by transformers alone; ``decoder/`` in the SD layout).

A component that saves itself returns the keyword arguments that reload it from its
subfolder (:meth:`metamorph_core.interfaces.Component.save_pretrained`). Writes are atomic;
loading is strict (every weight present, every shape right) and unpickles nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from metamorph_core import __version__
from metamorph_core.checkpoint import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    atomic_directory,
    load_tensors_strict,
    read_json,
    save_tensors,
    write_json,
)
from metamorph_core.config import MetaMorphConfig
from metamorph_core.dtypes import dtype_name, module_dtype, resolve_dtype
from metamorph_core.errors import CheckpointError
from metamorph_core.interfaces import SUBFOLDER
from metamorph_core.plugins.registry import create

FORMAT = "metamorph"
FORMAT_VERSION = 1
KINDS = ("encoder", "projector", "backbone", "head", "decoder")


def save_model(model: nn.Module, path: str | Path) -> Path:
    """Write ``model`` (a :class:`~metamorph_core.model.MetaMorphModel`) into the directory ``path`` (replaced atomically; a directory holding
    anything but an earlier checkpoint is refused)."""
    path = Path(path)
    with atomic_directory(path, FORMAT) as tmp:
        components: dict[str, Any] = {}
        tensors: dict[str, torch.Tensor] = {}
        for kind in model.present_kinds():
            module = getattr(model, kind)
            spec = getattr(model.config, kind)
            entry: dict[str, Any] = {"name": spec.name, "kwargs": spec.kwargs}
            (tmp / kind).mkdir()
            load_kwargs = module.save_pretrained(tmp / kind)
            if load_kwargs is None:
                (tmp / kind).rmdir()
                tensors.update({f"{kind}.{k}": v for k, v in module.state_dict().items()})
                if next(module.parameters(), None) is not None:
                    entry["dtype"] = dtype_name(module_dtype(module))
            else:
                entry.update(subfolder=kind, load_kwargs=load_kwargs)
            components[kind] = entry
        tensors.update(
            {f"visual_loss_fn.{k}": v for k, v in model.visual_loss_fn.state_dict().items()}
        )
        save_tensors(tensors, tmp / WEIGHTS_NAME, {"format": "pt"})
        write_json(
            tmp / CONFIG_NAME,
            {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "library_version": __version__,
                "model": model.config.to_dict(),
                "components": components,
                "image_start_id": model.backbone.image_start_id,
                "image_end_id": model.backbone.image_end_id,
                "num_image_tokens": model.num_image_tokens,
            },
        )
    return path


def load_model(cls: type, path: str | Path, dtype: str | None = None) -> Any:
    """A ``cls`` (:class:`~metamorph_core.model.MetaMorphModel`) from a directory written by
    :func:`save_model`; ``dtype`` overrides the backbone's recorded dtype."""
    path = Path(path)
    meta = read_json(path / CONFIG_NAME)
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: config.json is format {meta.get('format')!r} v{meta.get('format_version')}"
            f", this metamorph-core reads {FORMAT!r} v{FORMAT_VERSION}"
        )
    config = MetaMorphConfig.from_dict(meta["model"])
    entries = meta["components"]
    kinds = [k for k in KINDS if k in entries]
    built = {
        kind: _load_component(path, kind, entries[kind], dtype)
        for kind in kinds
        if "subfolder" in entries[kind] or kind in ("encoder", "backbone", "decoder")
    }
    model = cls.from_config(config, components=built)
    for kind in kinds:  # components kept in model.safetensors come back in their dtype
        if "dtype" in entries[kind]:
            getattr(model, kind).to(resolve_dtype(entries[kind]["dtype"]))
    in_subfolders = {kind for kind in kinds if "subfolder" in entries[kind]}
    expected = {
        k: v for k, v in model.state_dict().items() if k.split(".", 1)[0] not in in_subfolders
    }
    tensors = load_tensors_strict(path / WEIGHTS_NAME, expected, str(path))
    model.load_state_dict(tensors, strict=False)
    for key in ("image_start_id", "image_end_id"):
        if getattr(model.backbone, key) != meta[key]:
            raise CheckpointError(
                f"{path}: the tokenizer gives {key}={getattr(model.backbone, key)} but the "
                f"checkpoint was trained with {meta[key]}; the backbone/ tokenizer was changed"
            )
    return model


def _load_component(path: Path, kind: str, entry: dict[str, Any], dtype: str | None) -> nn.Module:
    kwargs = dict(entry["kwargs"])
    if "subfolder" in entry:
        sub = path / entry["subfolder"]
        if not sub.is_dir():
            raise CheckpointError(
                f"{path}: the {kind} subfolder '{entry['subfolder']}/' is missing"
            )
        kwargs = dict(entry["load_kwargs"])
        if SUBFOLDER in kwargs.values():
            kwargs = {k: str(sub) if v == SUBFOLDER else v for k, v in kwargs.items()}
        else:
            kwargs["pretrained"] = str(sub)
    if dtype is not None and kind == "backbone":
        kwargs["dtype"] = dtype
    return create(kind, entry["name"], **kwargs)
