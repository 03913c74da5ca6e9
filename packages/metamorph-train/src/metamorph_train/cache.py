"""The feature cache: the frozen encoder runs once over a dataset's images; training reads the
reduced tokens instead of running it again.

Layout of a cache directory: ``cache_config.json`` (the encoder that made it: registry name,
options, token shape, dtype; a different encoder is refused), ``index.json`` (image path ->
shard and row) and ``shard-RRRRR-KKKKK.safetensors`` files holding ``tokens`` ``(n, t, c)``.
Under ``torchrun`` every rank encodes its share (``paths[rank::world_size]``) and writes its
own shards and part index; the last rank to finish merges the parts. A cache is complete only
once ``index.json`` exists.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from metamorph_core.checkpoint import jsonable, write_json
from metamorph_core.conversation import ImageFeatures
from metamorph_train.data.images import ImageRoot

CONFIG = "cache_config.json"
INDEX = "index.json"


def encoder_signature(encoder: Any) -> dict[str, Any]:
    """What identifies the tokens an encoder produces: its registry name and options, token
    count and width."""
    spec = getattr(encoder, "metamorph_spec", None) or {
        "name": type(encoder).__name__,
        "kwargs": {},
    }
    return jsonable(
        {
            "name": spec["name"],
            "kwargs": spec["kwargs"],
            "num_tokens": encoder.num_tokens,
            "hidden_size": encoder.hidden_size,
        }
    )


def image_paths(records: Iterable[dict[str, Any]]) -> list[str]:
    """The distinct image paths of LLaVA-style records, sorted."""
    paths: set[str] = set()
    for r in records:
        image = r.get("image", [])
        paths.update([image] if isinstance(image, str) else image)
    return sorted(paths)


@torch.no_grad()
def build_cache(
    encoder: Any,
    paths: Sequence[str],
    image_root: str | Path,
    out: str | Path,
    batch_size: int = 64,
    shard_size: int = 4096,
    rank: int | None = None,
    world_size: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Encode ``paths`` (relative to ``image_root``) into a cache at ``out``; returns ``out``.
    ``rank``/``world_size`` default to torchrun's ``RANK``/``WORLD_SIZE``."""
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    signature = {**encoder_signature(encoder), "dtype": str(dtype).removeprefix("torch.")}
    config_path = out / CONFIG
    if config_path.exists():
        _check_signature(json.loads(config_path.read_text()), signature, out)
    elif rank == 0:
        write_json(config_path, signature)
    root = ImageRoot(image_root)
    mine = list(paths)[rank::world_size]
    device = next(encoder.parameters()).device
    index: dict[str, list[Any]] = {}
    for k, start in enumerate(range(0, max(len(mine), 1), shard_size)):
        chunk = mine[start : start + shard_size]
        if not chunk:
            break
        parts = []
        for b in range(0, len(chunk), batch_size):
            images = [root.load(p) for p in chunk[b : b + batch_size]]
            parts.append(encoder(encoder.preprocess(images).to(device)).to(dtype).cpu())
        name = f"shard-{rank:05d}-{k:05d}.safetensors"
        save_file({"tokens": torch.cat(parts).contiguous()}, str(out / f".{name}.tmp"))
        os.replace(out / f".{name}.tmp", out / name)
        index.update({p: [name, i] for i, p in enumerate(chunk)})
    part = out / f"index-{rank:05d}-of-{world_size:05d}.json"
    write_json(out / f".{part.name}.tmp", index)
    os.replace(out / f".{part.name}.tmp", part)
    _merge_if_complete(out, world_size)
    return out


def _merge_if_complete(out: Path, world_size: int) -> None:
    parts = [out / f"index-{r:05d}-of-{world_size:05d}.json" for r in range(world_size)]
    if not all(p.exists() for p in parts):
        return
    merged: dict[str, Any] = {}
    for p in parts:
        merged.update(json.loads(p.read_text()))
    tmp = out / f".{INDEX}.{os.getpid()}.tmp"
    write_json(tmp, merged)
    os.replace(tmp, out / INDEX)


def _check_signature(saved: dict[str, Any], expected: dict[str, Any], where: Path) -> None:
    if saved != expected:
        diff = {
            k: (saved.get(k), expected.get(k))
            for k in set(saved) | set(expected)
            if saved.get(k) != expected.get(k)
        }
        raise ValueError(
            f"feature cache '{where}' was made by another encoder configuration; differences "
            f"(cache, now): {diff}. Rebuild it with `metamorph cache-features` or point to the "
            "matching cache"
        )


class FeatureCache:
    """Read access to a complete cache, refusing one made by another encoder configuration."""

    def __init__(self, path: str | Path, encoder: Any) -> None:
        self.path = Path(path)
        if not (self.path / INDEX).is_file():
            raise FileNotFoundError(
                f"'{self.path}' is not a complete feature cache (no {INDEX}); build it with "
                "`metamorph cache-features`"
            )
        saved = json.loads((self.path / CONFIG).read_text())
        _check_signature(
            {k: v for k, v in saved.items() if k != "dtype"}, encoder_signature(encoder), self.path
        )
        self.index = json.loads((self.path / INDEX).read_text())
        self._open: dict[str, Any] = {}

    def __contains__(self, image: str) -> bool:
        return image in self.index

    def __len__(self) -> int:
        return len(self.index)

    def get(self, image: str) -> ImageFeatures:
        if image not in self.index:
            raise KeyError(f"image '{image}' is not in feature cache '{self.path}'; rebuild it")
        shard, row = self.index[image]
        if shard not in self._open:
            self._open[shard] = safe_open(str(self.path / shard), framework="pt")
        return ImageFeatures(self._open[shard].get_slice("tokens")[row].float())
