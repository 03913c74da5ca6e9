"""Saving and loading unified models: a checkpoint directory holds ``config.json`` (format,
library version, the :class:`~metamorph_core.config.MetaMorphConfig`, each component's
registry name and kwargs, the image token ids, the model card data, the list of the other
files that loading reads), ``model.safetensors``
(every component that does not save itself), a subfolder per component that does
(``backbone/`` in plain transformers format, loadable by transformers alone; ``decoder/`` in
the SD layout) and ``README.md``, the model card (:mod:`metamorph_core.model_card`), which
loading ignores.

A component that saves itself returns the keyword arguments that reload it from its
subfolder (:meth:`metamorph_core.interfaces.Component.save_pretrained`); a path in them may be
relative to the checkpoint (:data:`~metamorph_core.interfaces.CHECKPOINT_DIR`). Writes are
atomic; loading is strict (every weight present, every shape right) and unpickles nothing.
Before any component loads, every listed file must be there and every safetensors and JSON
file in the checkpoint must be whole (:func:`~metamorph_core.checkpoint.check_files`), so a
damaged checkpoint is a :class:`~metamorph_core.errors.CheckpointError` naming the file; so is
a component that is not installed (naming the package to install) or a newer format.
A checkpoint may be named by a Hugging Face Hub repo id (:mod:`metamorph_core.hub`).
"""

from __future__ import annotations

import dataclasses
import logging
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from metamorph_core import __version__
from metamorph_core.checkpoint import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    atomic_directory,
    check_files,
    load_tensors_strict,
    read_json,
    save_tensors,
    write_json,
)
from metamorph_core.config import MetaMorphConfig
from metamorph_core.dtypes import dtype_name, module_dtype, resolve_dtype
from metamorph_core.errors import CheckpointError, ComponentNotFoundError
from metamorph_core.hub import resolve_pretrained, upload_checkpoint
from metamorph_core.interfaces import CHECKPOINT_DIR, SUBFOLDER
from metamorph_core.model_card import CARD_NAME, ModelCardData, render_model_card
from metamorph_core.plugins.registry import create

FORMAT = "metamorph"
FORMAT_VERSION = 1
KINDS = ("encoder", "projector", "backbone", "head", "decoder")
logger = logging.getLogger("metamorph")


def save_model(
    model: nn.Module,
    path: str | Path,
    card_data: ModelCardData | dict[str, Any] | None = None,
    repo_id: str | None = None,
) -> Path:
    """Write ``model`` (a :class:`~metamorph_core.model.MetaMorphModel`) into the directory
    ``path`` (replaced atomically; a directory holding anything but an earlier checkpoint is
    refused). ``card_data`` (default: the model's ``card_data``) goes into ``config.json`` and
    the model card; ``repo_id`` is the name the card's usage example loads."""
    path = Path(path)
    card = ModelCardData.of(card_data if card_data is not None else model.card_data)
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
        # every file written so far, so that loading names one that has gone missing
        files = sorted(f.relative_to(tmp).as_posix() for f in tmp.rglob("*") if f.is_file())
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "library_version": __version__,
            "model": model.config.to_dict(),
            "components": components,
            "image_start_id": model.backbone.image_start_id,
            "image_end_id": model.backbone.image_end_id,
            "num_image_tokens": model.num_image_tokens,
            "files": files,
        }
        if card.to_dict():
            meta["card_data"] = card.to_dict()
        write_json(tmp / CONFIG_NAME, meta)
        (tmp / CARD_NAME).write_text(render_model_card(model, card, repo_id))
    return path


def push_model(
    model: nn.Module,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    card_data: ModelCardData | dict[str, Any] | None = None,
) -> Any:
    """Save ``model`` with :func:`save_model` into a temporary directory and upload it to the
    Hub model repo ``repo_id`` in one commit (:func:`~metamorph_core.hub.upload_checkpoint`);
    files of an earlier checkpoint there (component subfolders, weights) that this one lacks
    are deleted in that commit, other files stay. Returns the ``CommitInfo``."""
    with tempfile.TemporaryDirectory(prefix="metamorph-push-") as tmp:
        path = save_model(model, Path(tmp) / "checkpoint", card_data, repo_id=repo_id)
        local = {
            kind: entry["load_kwargs"]["pretrained"]
            for kind, entry in read_json(path / CONFIG_NAME)["components"].items()
            if _is_local_path(entry.get("load_kwargs", {}).get("pretrained"))
        }
        for kind, source in local.items():
            logger.warning(
                "pushing %s: its %s refers to the local path '%s', which is not uploaded; "
                "loading from the Hub needs it there (merge LoRA first with model.merge_lora(), "
                "or build the %s from a Hub id)",
                repo_id,
                kind,
                source,
                kind,
            )
        return upload_checkpoint(
            path,
            repo_id,
            private=private,
            token=token,
            revision=revision,
            commit_message=commit_message,
            replace_patterns=[f"{kind}/*" for kind in KINDS] + ["*.safetensors"],
        )


def _is_local_path(value: Any) -> bool:
    return isinstance(value, str) and (
        value.startswith(CHECKPOINT_DIR) or Path(value).is_absolute()
    )


def load_model(
    cls: type,
    path: str | Path,
    dtype: str | None = None,
    *,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool | None = None,
    token: str | bool | None = None,
    backbone_kwargs: dict[str, Any] | None = None,
) -> Any:
    """A ``cls`` (:class:`~metamorph_core.model.MetaMorphModel`) from a directory written by
    :func:`save_model`, or from a Hub repo id holding one (fetched at ``revision`` into
    ``cache_dir``; see :func:`~metamorph_core.hub.resolve_pretrained`); ``dtype`` overrides the
    backbone's recorded dtype, ``backbone_kwargs`` any of its recorded load options."""
    path = resolve_pretrained(
        path,
        revision=revision,
        cache_dir=cache_dir,
        local_files_only=local_files_only,
        token=token,
        what="checkpoint",
    )
    meta = read_json(path / CONFIG_NAME, path)
    _check_format(path, meta)
    check_files(path, expected=meta.get("files", ()))
    try:
        config = MetaMorphConfig.from_dict(meta["model"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(
            f"checkpoint '{path}'{_written_by(meta)}: the 'model' section of its config.json "
            f"does not fit this metamorph-core {__version__}: {e}"
        ) from e
    entries = meta["components"]
    kinds = [k for k in KINDS if k in entries]
    try:
        built = {
            kind: _load_component(path, kind, entries[kind], dtype, backbone_kwargs)
            for kind in kinds
            if "subfolder" in entries[kind] or kind in ("encoder", "backbone", "decoder")
        }
        model = cls.from_config(config, components=built)
    except ComponentNotFoundError as e:
        raise _not_installed(path, e, entries) from e
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
    model.card_data = _card_data(path, meta.get("card_data"))
    return model


def _check_format(path: Path, meta: dict[str, Any]) -> None:
    """A :class:`CheckpointError` unless ``meta`` (config.json) is a checkpoint of
    :data:`FORMAT` v:data:`FORMAT_VERSION` with the fields loading reads."""
    fmt, version = meta.get("format"), meta.get("format_version")
    if fmt != FORMAT:
        what = f"format {fmt!r}" if fmt is not None else "no 'format'"
        if "model_type" in meta:
            what = f"a transformers model (model_type {meta['model_type']!r})"
        raise CheckpointError(
            f"'{path}' is not a MetaMorph checkpoint: its config.json has {what}, not format "
            f"'{FORMAT}' (what MetaMorphModel.save_pretrained writes); check the path (a "
            "component's subfolder, such as backbone/, is not a checkpoint: load its parent)"
        )
    if isinstance(version, int) and version > FORMAT_VERSION:
        writer = meta.get("library_version", "a newer version")
        raise CheckpointError(
            f"checkpoint '{path}' is format v{version}, written by metamorph-core {writer}; "
            f"this metamorph-core {__version__} reads format v{FORMAT_VERSION}: upgrade it "
            "(pip install -U metamorph-core)"
        )
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint '{path}': config.json has format_version {version!r}, not a version "
            f"that metamorph-core writes (this {__version__} reads v{FORMAT_VERSION}); it was "
            "edited or is damaged: restore it, or save or download the checkpoint again"
        )
    missing = [
        k for k in ("model", "components", "image_start_id", "image_end_id") if k not in meta
    ]
    if missing:
        raise CheckpointError(
            f"checkpoint '{path}': config.json lacks {missing}; it was edited or is damaged: "
            "restore it, or save or download the checkpoint again"
        )


def _written_by(meta: dict[str, Any]) -> str:
    """``" (written by metamorph-core X)"`` from config.json's library_version, saying to
    upgrade when X is newer than this one; ``""`` when it is not recorded."""
    writer = meta.get("library_version")
    if not isinstance(writer, str):
        return ""
    if _release(writer) > _release(__version__):
        return f" (written by metamorph-core {writer}: upgrade, pip install -U metamorph-core)"
    return f" (written by metamorph-core {writer})"


def _release(version: str) -> tuple[int, ...]:
    """The leading numbers of a version string: ``"0.12.1.dev3"`` -> ``(0, 12, 1)``."""
    numbers = re.match(r"\d+(?:\.\d+)*", version)
    return tuple(int(n) for n in numbers.group().split(".")) if numbers else ()


def _not_installed(
    path: Path, error: ComponentNotFoundError, entries: dict[str, Any]
) -> CheckpointError:
    """``error`` (a component that the checkpoint needs is not registered) naming the
    checkpoint, and the field of config.json that names the component when it is one."""
    field = ""
    if error.kind in entries and entries[error.kind].get("name") == error.name:
        field = f" (config.json: components.{error.kind}.name)"
    return CheckpointError(
        f"checkpoint '{path}' needs the {error.kind} '{error.name}'{field}, which is not "
        f"registered here: {error}"
    )


def _load_component(
    path: Path,
    kind: str,
    entry: dict[str, Any],
    dtype: str | None,
    backbone_kwargs: dict[str, Any] | None = None,
) -> nn.Module:
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
        kwargs = {k: _in_checkpoint(path, kind, k, v) for k, v in kwargs.items()}
    if dtype is not None and kind == "backbone":
        kwargs["dtype"] = dtype
    if kind == "backbone":
        kwargs.update(backbone_kwargs or {})
    return create(kind, entry["name"], **kwargs)


def _in_checkpoint(path: Path, kind: str, key: str, value: Any) -> Any:
    """``value`` with a leading :data:`~metamorph_core.interfaces.CHECKPOINT_DIR` replaced by
    the checkpoint directory ``path`` (which must then hold what it names)."""
    prefix = CHECKPOINT_DIR + "/"
    if not (isinstance(value, str) and value.startswith(prefix)):
        return value
    target = (path / value[len(prefix) :]).resolve()
    if not target.exists():
        raise CheckpointError(
            f"{path}: the {kind}'s {key} '{value}' is a path relative to the checkpoint, "
            f"'{target}', which does not exist; keep it in the same place relative to the "
            "checkpoint (move both together), or set "
            f"components.{kind}.load_kwargs.{key} in config.json to its path or Hub id"
        )
    if target.is_dir() and not target.is_relative_to(path.resolve()):
        try:  # a directory the checkpoint needs, e.g. a LoRA adapter's base model
            check_files(target, "model directory")
        except CheckpointError as e:
            raise CheckpointError(
                f"checkpoint '{path}' needs the {kind}'s {key} '{value}': {e}"
            ) from e
    return str(target)


def _card_data(path: Path, saved: Any) -> ModelCardData:
    """The saved card data; fields this version does not know (a newer writer's) are dropped
    with a warning rather than refusing a loadable model."""
    if not isinstance(saved, dict):
        return ModelCardData()
    known = {f.name for f in dataclasses.fields(ModelCardData)}
    unknown = sorted(set(saved) - known)
    if unknown:
        logger.warning("%s: model card fields %s are not known here; ignored", path, unknown)
    return ModelCardData.of({k: v for k, v in saved.items() if k in known})
