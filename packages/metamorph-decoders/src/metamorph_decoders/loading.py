"""Reading Stable-Diffusion-layout directories (local, or fetched from the Hugging Face Hub by
repo id), and mapping a base UNet's weights onto a UNet
built for another cross-attention width.

Only the cross-attention key/value projections (``attn2.to_k`` / ``attn2.to_v``) read the
context, so only they change shape when the context width changes. :func:`plan_weight_load`
decides, from shapes alone, which weights load and which are re-initialised; it runs on
meta-device models, so it can be checked against Stable Diffusion 1.5's full-size config
without its weights.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from metamorph_core.checkpoint import damaged_files, read_json
from metamorph_core.errors import CheckpointError
from metamorph_core.hub import resolve_pretrained

CROSS_ATTENTION_KV = re.compile(r"\.attn2\.to_[kv]\.weight$")
#: the files of a decoder directory that loading reads: a Hub repo of a whole Stable Diffusion
#: pipeline (text encoder, safety checker, fp16 / non-EMA / pickled variants) is fetched for
#: these alone
DECODER_FILES = (
    "config.json",
    "adapter.safetensors",
    "scheduler/scheduler_config.json",
    *(
        f"{part}/{name}"
        for part in ("unet", "vae")
        for name in (
            "config.json",
            "diffusion_pytorch_model.safetensors",
            "diffusion_pytorch_model.safetensors.index.json",
            "diffusion_pytorch_model-*-of-*.safetensors",
        )
    ),
)


@dataclass
class LoadPlan:
    load: list[str]  # keys copied from the source
    reinit: list[str]  # keys left at their fresh initialisation (shape changed)


def plan_weight_load(
    source: Mapping[str, tuple[int, ...]], target: Mapping[str, tuple[int, ...]], where: str
) -> LoadPlan:
    """Which of ``target``'s weights come from ``source`` (same key and shape) and which are
    re-initialised (cross-attention K/V whose input width changed). Anything else that does not
    match is an error naming the keys."""
    missing = sorted(set(target) - set(source))
    unexpected = sorted(set(source) - set(target))
    if missing or unexpected:
        raise CheckpointError(
            f"{where}: the UNet weights do not match its config: missing {missing[:8]}, "
            f"unexpected {unexpected[:8]}"
        )
    load, reinit = [], []
    for key, shape in target.items():
        if tuple(source[key]) == tuple(shape):
            load.append(key)
        elif CROSS_ATTENTION_KV.search(key) and tuple(source[key])[0] == tuple(shape)[0]:
            reinit.append(key)
        else:
            raise CheckpointError(
                f"{where}: weight '{key}' has shape {tuple(source[key])} but the model needs "
                f"{tuple(shape)}; only cross-attention K/V may change width"
            )
    return LoadPlan(sorted(load), sorted(reinit))


def resolve_decoder_dir(
    pretrained: str | Path,
    subfolder: str | None = None,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool | None = None,
) -> Path:
    """The local decoder directory of ``pretrained``: a directory, or a Hub repo id whose
    :data:`DECODER_FILES` (under ``subfolder``, e.g. ``"decoder"`` in a MetaMorph checkpoint's
    repo) are fetched at ``revision`` (:func:`metamorph_core.hub.resolve_pretrained`)."""
    return resolve_pretrained(
        pretrained,
        subfolder=subfolder,
        revision=revision,
        cache_dir=cache_dir,
        local_files_only=local_files_only,
        allow_patterns=DECODER_FILES,
        what="decoder 'sd-unet' pretrained",
    )


def subfolder(root: Path, name: str) -> Path:
    path = root / name
    if not path.is_dir():
        raise CheckpointError(
            f"'{root}' has no {name}/ subfolder; a decoder directory has the Stable Diffusion "
            "layout (unet/, scheduler/, and vae/ for latent mode)"
        )
    return path


def read_saved_config(root: Path) -> dict[str, Any]:
    """The settings a saved decoder recorded in ``root/config.json`` (``{}`` for a plain
    Stable Diffusion directory, which has none); a damaged file, or a saved decoder without the
    ``adapter.safetensors`` it recorded, is a :class:`CheckpointError` naming the file."""
    if not root.is_dir():
        raise CheckpointError(f"decoder directory '{root}' does not exist")
    path = root / "config.json"
    if not path.is_file():
        return {}
    saved = read_json(path, root, "decoder")
    adapter = root / "adapter.safetensors"
    if saved.get("weights") and not adapter.is_file():
        raise damaged_files(root, [(adapter, "is missing")], "decoder")
    return saved


def load_unet_weights(unet_dir: Path) -> dict[str, torch.Tensor]:
    """The UNet's own weights file (or the shards its index names); variants such as
    ``.fp16`` or ``.non_ema`` next to it are ignored."""
    single = unet_dir / "diffusion_pytorch_model.safetensors"
    index = unet_dir / "diffusion_pytorch_model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        files = [
            unet_dir / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))
        ]
    else:
        raise CheckpointError(
            f"'{unet_dir}' has no diffusion_pytorch_model.safetensors (or sharded index); only "
            "safetensors are read, nothing is unpickled"
        )
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state
