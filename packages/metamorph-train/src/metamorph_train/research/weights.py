"""Reading the research code's weight files, safely.

Safetensors are read on demand, key by key. Pickled files (``pytorch_model.bin`` and its
shards, the visualizer's ``.pt`` files) are loaded only with
``torch.load(path, map_location="cpu", weights_only=True)``, which unpickles tensors and plain
containers and nothing else; a file it refuses is a
:class:`~metamorph_core.errors.CheckpointError` saying why and how to convert it.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from metamorph_core.errors import CheckpointError

# (weights file, sharded index), in the order they are looked for
LAYOUTS = (
    ("model.safetensors", "model.safetensors.index.json"),
    ("pytorch_model.bin", "pytorch_model.bin.index.json"),
)


def read_config(root: Path, model_type: str) -> dict[str, Any]:
    """``root/config.json``, which must say ``model_type`` ``model_type``."""
    path = root / "config.json"
    if not path.is_file():
        raise CheckpointError(
            f"'{root}' has no config.json; expected a directory written by save_pretrained of "
            f"the research code's MetaMorphLlamaForCausalLM (model_type '{model_type}')"
        )
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e
    if config.get("model_type") != model_type:
        raise CheckpointError(
            f"{path} has model_type {config.get('model_type')!r}, not '{model_type}': this is "
            "not a checkpoint of the research code (facebookresearch/metamorph). A MetaMorph "
            "checkpoint loads with MetaMorphModel.from_pretrained as it is"
        )
    return config


def safe_torch_load(path: Path, what: str) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)``; a refusal (or a damaged
    file) is a ``CheckpointError`` naming ``what``, the reason and the fix."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"refusing to load {what} '{path}': torch.load(weights_only=True) rejects it "
            f"({reason}). Only tensors and plain containers are unpickled, since a pickle can "
            "run arbitrary code. If you trust the file, convert it to safetensors in a separate "
            "step (load it, then safetensors.torch.save_file(state_dict, "
            f"'{path.with_suffix('.safetensors').name}')) and convert that"
        ) from e


def state_dict_of(obj: Any, path: Path, entry: str | None = None) -> dict[str, torch.Tensor]:
    """``obj`` (or ``obj[entry]``) checked to be a state dict: string keys, tensor values."""
    if entry is not None:
        if not isinstance(obj, dict) or entry not in obj:
            keys = sorted(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
            raise CheckpointError(
                f"'{path}' has no '{entry}' entry (found {keys}); the research visualizer "
                f"saves its weights under '{entry}'"
            )
        obj = obj[entry]
    if not isinstance(obj, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise CheckpointError(
            f"'{path}'{f' [{entry!r}]' if entry else ''} is not a state dict (a dict of names to "
            "tensors); save model.state_dict(), not the module or other objects"
        )
    return obj


class TensorSource:
    """The tensors of a ``save_pretrained`` directory, by key: ``model.safetensors``, sharded
    ``model-*.safetensors`` with ``model.safetensors.index.json``, or the same two layouts of
    ``pytorch_model*.bin`` (loaded with ``weights_only=True``). Safetensors are read on
    demand; a pickled file is loaded whole on first use."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._where: dict[str, Path] = {}
        self._loaded: dict[Path, dict[str, torch.Tensor]] = {}
        for single, index in LAYOUTS:
            if (root / single).is_file():
                self._add_file(root / single)
                self.description = single
                return
            if (root / index).is_file():
                self._add_index(root / index)
                shards = len(set(self._where.values()))
                self.description = f"{index} ({shards} shards)"
                return
        looked = ", ".join(name for layout in LAYOUTS for name in layout)
        raise CheckpointError(
            f"'{root}' holds no weights: looked for {looked}. A stage-1 folder holding only "
            "mm_projector.bin cannot be converted alone; convert the stage-2 (full) checkpoint"
        )

    def _add_file(self, path: Path) -> None:
        for key in self._file_keys(path):
            self._where[key] = path

    def _add_index(self, index: Path) -> None:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a sharded-weights index ({e})") from e
        for key, name in weight_map.items():
            shard = self.root / name
            if not shard.is_file():
                raise CheckpointError(
                    f"{index} names shard '{name}' (for '{key}'), which is missing from "
                    f"'{self.root}'; copy every shard of the checkpoint"
                )
            self._where[key] = shard

    def _file_keys(self, path: Path) -> list[str]:
        if path.suffix == ".safetensors":
            with safe_open(str(path), "pt") as f:
                return list(f.keys())
        return list(self._load_pickled(path))

    def _load_pickled(self, path: Path) -> dict[str, torch.Tensor]:
        if path not in self._loaded:
            obj = safe_torch_load(path, "the weights file")
            self._loaded[path] = state_dict_of(obj, path)
        return self._loaded[path]

    def names(self) -> list[str]:
        """Every tensor name, sorted."""
        return sorted(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def get(self, key: str) -> torch.Tensor:
        path = self._where[key]
        if path.suffix == ".safetensors":
            with safe_open(str(path), "pt") as f:
                return f.get_tensor(key)
        state = self._load_pickled(path)
        if key not in state:
            raise CheckpointError(
                f"the index of '{self.root}' puts '{key}' in {path.name}, "
                "which does not hold it; the index and shards disagree"
            )
        return state[key]

    def release(self) -> None:
        """Drop the pickled files loaded so far (safetensors are never held)."""
        self._loaded.clear()
