"""Where the tower of the ``open_clip`` encoder comes from (see
:mod:`metamorph_encoders.open_clip_encoder` for the options): the weights file that
``pretrained`` names (a pretrained tag, a file, a directory or a Hub repo), what the checkpoint
says about architecture and preprocessing, and the architecture to build."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from metamorph_core.errors import CheckpointError
from metamorph_core.hub import is_hub_id, resolve_pretrained

NAME = "open_clip"
CONFIG = "open_clip_config.json"
#: weight files looked for in a directory or Hub repo: open_clip's own names first (a timm Hub
#: repo's ``model.safetensors`` holds the timm model, not the open_clip one)
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors")
WEIGHTS = "model.safetensors"  # also what the encoder's save_pretrained writes: the tower alone


@dataclass
class Source:
    """Where the weights are, and what the checkpoint says about architecture and preprocessing."""

    weights: Path | None = None
    model_cfg: dict[str, Any] | None = None
    preprocess: dict[str, Any] = field(default_factory=dict)
    quick_gelu: bool | None = None  # what a pretrained tag's weights were trained with


def find_source(pretrained: str | Path | None, model_name: str | None, open_clip: Any) -> Source:
    """What ``pretrained`` names: ``None`` (random weights), a pretrained tag of ``model_name``,
    a directory, a ``.safetensors`` file or a Hub repo id (tried in that order)."""
    if pretrained is None or pretrained is False:
        return Source()
    text = os.fspath(pretrained)
    tag = text.lower().replace("-", "_")  # as open_clip spells its tags
    if model_name and tag in open_clip.list_pretrained_tags_by_model(model_name):
        return _tag_source(model_name, tag, open_clip)
    path = Path(text).expanduser()
    if path.is_dir():
        return _directory_source(path, f"'{path}'")
    if path.suffix == ".safetensors" or path.is_file():
        if path.suffix != ".safetensors":
            raise CheckpointError(
                f"encoder '{NAME}': '{path}' is not a .safetensors file; convert the checkpoint "
                "to safetensors (nothing is unpickled)"
            )
        if not path.is_file():
            raise CheckpointError(f"encoder '{NAME}': no weights file at '{path}'")
        return Source(weights=path)
    if isinstance(pretrained, str) and is_hub_id(pretrained):
        return _directory_source(_hub_snapshot(text, f"encoder '{NAME}': Hub repo"), f"'{text}'")
    tags = open_clip.list_pretrained_tags_by_model(model_name) if model_name else []
    raise CheckpointError(
        f"encoder '{NAME}': pretrained '{text}' is no file, directory or Hub repo id"
        + (f", nor a pretrained tag of '{model_name}' (its tags: {tags})" if model_name else "")
    )


def _tag_source(model_name: str, tag: str, open_clip: Any) -> Source:
    cfg = open_clip.get_pretrained_cfg(model_name, tag)
    parts = [p for p in cfg.get("hf_hub", "").split("/") if p]
    if len(parts) < 2:
        raise CheckpointError(
            f"encoder '{NAME}': the pretrained tag '{tag}' of '{model_name}' has no Hub repo, "
            f"only a URL ({cfg.get('url')}) to a pickled file, which is never unpickled here; "
            "convert that file to safetensors and pass its path as pretrained="
        )
    repo = "/".join(parts[:2])  # 'org/name/' or 'org/name/file'
    what = f"encoder '{NAME}': pretrained tag '{tag}' of '{model_name}' is the Hub repo"
    source = _directory_source(_hub_snapshot(repo, what), f"Hub repo '{repo}'")
    keys = ("mean", "std", "interpolation", "resize_mode")
    source.preprocess = {**source.preprocess, **{k: cfg[k] for k in keys if k in cfg}}
    source.quick_gelu = bool(cfg.get("quick_gelu", False))
    return source


def _hub_snapshot(repo: str, what: str) -> Path:
    """The cached (or fetched) snapshot of Hub repo ``repo`` with its open_clip config and
    weights; ``model.safetensors`` only when the repo has neither of open_clip's names."""
    directory = resolve_pretrained(repo, allow_patterns=[CONFIG, *OPEN_CLIP_WEIGHTS], what=what)
    if not any((directory / name).is_file() for name in OPEN_CLIP_WEIGHTS):
        directory = resolve_pretrained(repo, allow_patterns=[CONFIG, WEIGHTS], what=what)
    return directory


def _directory_source(directory: Path, shown: str) -> Source:
    names = (*OPEN_CLIP_WEIGHTS, WEIGHTS)
    weights = next((directory / n for n in names if (directory / n).is_file()), None)
    if weights is None:
        pickled = sorted(p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
        found = (
            f"; it holds pickled weights {pickled}, which are never unpickled" if pickled else ""
        )
        raise CheckpointError(
            f"encoder '{NAME}': {shown} holds none of {list(names)}{found}; convert the "
            "weights to safetensors"
        )
    config: dict[str, Any] = {}
    if (directory / CONFIG).is_file():
        try:
            config = json.loads((directory / CONFIG).read_text())
        except ValueError as e:
            raise CheckpointError(
                f"encoder '{NAME}': '{directory / CONFIG}' is not JSON: {e}"
            ) from e
    return Source(weights, config.get("model_cfg"), dict(config.get("preprocess_cfg") or {}))


def architecture(
    model_name: str | None,
    model_cfg: dict[str, Any] | None,
    vision_cfg: dict[str, Any] | None,
    source: Source,
    open_clip: Any,
) -> dict[str, Any]:
    """``{"embed_dim", "quick_gelu", "vision_cfg"}`` of the tower to build."""
    if model_name is not None and model_cfg is not None:
        raise ValueError(f"encoder '{NAME}': give model_name= or model_cfg=, not both")
    if model_name is not None:
        if model_name.startswith(("hf-hub:", "local-dir:")):
            where = model_name.split(":", 1)[1]
            raise ValueError(
                f"encoder '{NAME}': model_name '{model_name}' names a checkpoint; pass "
                f"pretrained='{where}' instead (its {CONFIG} names the architecture)"
            )
        cfg = open_clip.get_model_config(model_name)
        if cfg is None:
            raise ValueError(
                f"encoder '{NAME}': unknown model '{model_name}'; see open_clip.list_models(), "
                f"e.g. {open_clip.list_models()[::12]}"
            )
    elif model_cfg is not None:
        cfg = model_cfg
    elif source.model_cfg is not None:
        cfg = source.model_cfg
    else:
        raise ValueError(
            f"encoder '{NAME}' needs model_name= (an open_clip architecture such as 'ViT-B-32'), "
            f"model_cfg=, or pretrained= a directory or Hub repo holding {CONFIG}"
        )
    if not isinstance(cfg.get("vision_cfg"), dict) or "embed_dim" not in cfg:
        raise ValueError(
            f"encoder '{NAME}': the model config needs 'embed_dim' and a 'vision_cfg' dict, "
            f"got keys {sorted(cfg)}"
        )
    return {
        "embed_dim": int(cfg["embed_dim"]),
        "quick_gelu": bool(cfg.get("quick_gelu", False)),
        "vision_cfg": {**cfg["vision_cfg"], **(vision_cfg or {})},
    }
