"""The feature cache: the frozen encoder runs once over a dataset's images; training reads the
reduced tokens instead of running it again.

Layout of a cache directory: ``cache_config.json`` (the encoder that made it: registry name,
options, token shape, dtype; a different encoder is refused), ``index.json`` (image path ->
shard and row) and ``shard-RRRRR-KKKKK.safetensors`` files holding ``tokens`` ``(n, t, c)``.

A *predicted* cache (:func:`build_predicted_cache`, ``metamorph cache-features
--predicted-by``) holds, for each text-to-image record, the tokens a trained unified model
generates from the record's prompt, keyed by the record's target image: training data for a
decoder that is to draw from the LLM's predictions, not only from the encoder's exact tokens.
Its ``cache_config.json`` names the model (``predicted_by``); only the ``decoder`` recipe reads
such a cache.
Under ``torchrun`` every rank encodes its share (``paths[rank::world_size]``) and writes its
own shards and part index; the last rank to finish merges the parts. A cache is complete only
once ``index.json`` exists.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from metamorph_core.checkpoint import jsonable, write_json
from metamorph_core.conversation import ImageFeatures
from metamorph_core.pixels import move_pixels
from metamorph_train.data.images import ImageRoot

CONFIG = "cache_config.json"
INDEX = "index.json"


def encoder_signature(encoder: Any, spec: dict[str, Any] | None = None) -> dict[str, Any]:
    """What identifies the tokens an encoder produces: its registry name and options (``spec``
    when given, e.g. as a unified model's config names it), token count and width."""
    spec = (
        spec
        or getattr(encoder, "metamorph_spec", None)
        or {
            "name": type(encoder).__name__,
            "kwargs": {},
        }
    )
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
    progress: bool = True,
) -> Path:
    """Encode ``paths`` (relative to ``image_root``) into a cache at ``out``; returns ``out``.
    ``rank``/``world_size`` default to torchrun's ``RANK``/``WORLD_SIZE``. ``progress``: a
    progress bar with ETA on rank 0 (on a terminal; counts this rank's images)."""
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
    device = next(encoder.parameters()).device

    def encode(chunk: list[str]) -> torch.Tensor:
        return encoder(move_pixels(encoder.preprocess([root.load(p) for p in chunk]), device))

    mine = list(paths)[rank::world_size]
    bar = _bar(progress and rank == 0, len(mine), "cache-features", "image")
    _write_shards(out, mine, encode, (rank, world_size), batch_size, shard_size, dtype, bar)
    return out


def _write_shards(
    out: Path,
    keys: list[Any],
    make: Callable[[list[Any]], torch.Tensor],
    rank_of: tuple[int, int],
    batch_size: int,
    shard_size: int,
    dtype: torch.dtype,
    bar: Any = None,
) -> None:
    """Write ``make(batch of keys)`` ``(b, t, c)`` tokens for this rank's ``keys`` into shards
    and a part index (each file atomically), then merge the index once every rank's part is
    there. A key is an image path, or a tuple whose first element is one. ``bar``: a tqdm bar
    advanced per batch and closed at the end (``None``: none)."""
    rank, world_size = rank_of
    index: dict[str, list[Any]] = {}

    def batch(some: list[Any]) -> torch.Tensor:
        tokens = make(some).to(dtype).cpu()
        if bar is not None:
            bar.update(len(some))
        return tokens

    for k, start in enumerate(range(0, max(len(keys), 1), shard_size)):
        chunk = keys[start : start + shard_size]
        if not chunk:
            break
        parts = [batch(chunk[b : b + batch_size]) for b in range(0, len(chunk), batch_size)]
        name = f"shard-{rank:05d}-{k:05d}.safetensors"
        save_file({"tokens": torch.cat(parts).contiguous()}, str(out / f".{name}.tmp"))
        os.replace(out / f".{name}.tmp", out / name)
        paths = [key[0] if isinstance(key, tuple) else key for key in chunk]
        index.update({p: [name, i] for i, p in enumerate(paths)})
    if bar is not None:
        bar.close()
    part = out / f"index-{rank:05d}-of-{world_size:05d}.json"
    write_json(out / f".{part.name}.tmp", index)
    os.replace(out / f".{part.name}.tmp", part)
    _merge_if_complete(out, world_size)


def _bar(show: bool, total: int, desc: str, unit: str) -> Any:
    """A tqdm progress bar with ETA, or ``None`` when ``show`` is false; on a non-terminal
    stderr tqdm stays quiet."""
    if not show:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=None, leave=False)


def generation_prompts(records: Iterable[dict[str, Any]]) -> list[tuple[str, Any, str]]:
    """``(target image path, prompt conversation, response prefix)`` of every text-to-image
    record, i.e. one whose last ``gpt`` turn holds one ``<image>``: the prompt is the turns
    before it, the prefix that turn's text before ``<image>``. Other records are left out; a
    text-to-image record whose prompt holds images too is refused (not supported yet)."""
    from metamorph_core.conversation import Conversation

    out = []
    for r in records:
        turns = r["conversations"]
        if (
            turns[-1]["from"] not in ("gpt", "assistant")
            or turns[-1]["value"].count("<image>") != 1
        ):
            continue
        if any("<image>" in t["value"] for t in turns[:-1]):
            raise ValueError(
                f"record {r.get('id')!r}: its prompt holds images; predicted-token caches are "
                "built from text-to-image records only"
            )
        image = r["image"] if isinstance(r["image"], str) else r["image"][-1]
        prompt = Conversation.from_llava({**r, "conversations": turns[:-1], "image": []})
        out.append((image, prompt, turns[-1]["value"].split("<image>")[0]))
    return out


@torch.no_grad()
def build_predicted_cache(
    model: Any,
    records: Iterable[dict[str, Any]],
    out: str | Path,
    predicted_by: str,
    batch_size: int = 32,
    shard_size: int = 4096,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> int:
    """Cache, under each text-to-image record's target image, the visual tokens ``model`` (a
    :class:`~metamorph_core.MetaMorphModel`) generates greedily from the record's prompt, as
    inference does; returns how many images were cached (the first record naming an image
    gives its prompt; none: nothing is written). ``predicted_by`` (the model's checkpoint) goes into the cache's
    config. ``progress``: a progress bar with ETA (on a terminal)."""
    first: dict[str, tuple[str, Any, str]] = {}
    for item in generation_prompts(records):
        first.setdefault(item[0], item)
    if not first:
        return 0  # nothing written
    keys = [first[p] for p in sorted(first)]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # the encoder as the model's config names it (what a decoder recipe's model.encoder
    # says), not as the checkpoint reloads it from its own subfolder
    named = {"name": model.config.encoder.name, "kwargs": model.config.encoder.kwargs}
    signature = {
        **encoder_signature(model.encoder, named),
        "dtype": str(dtype).removeprefix("torch."),
        "predicted_by": str(predicted_by),
    }
    if (out / CONFIG).exists():
        _check_signature(json.loads((out / CONFIG).read_text()), signature, out)
    else:
        write_json(out / CONFIG, signature)

    def predict(chunk: list[tuple[str, Any, str]]) -> torch.Tensor:
        results = model.generate_image(
            [prompt for _, prompt, _ in chunk], response_prefix=[p for _, _, p in chunk]
        )
        return torch.stack([r.images[0] for r in results])

    bar = _bar(progress, len(keys), "predict tokens", "image")
    _write_shards(out, keys, predict, (0, 1), batch_size, shard_size, dtype, bar)
    return len(keys)


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

    def __init__(self, path: str | Path, encoder: Any, allow_predicted: bool = False) -> None:
        """``allow_predicted``: accept a predicted cache (:func:`build_predicted_cache`). Only
        decoder training should: its tokens are an LLM's guesses, not the images' encoding."""
        self.path = Path(path)
        if not (self.path / INDEX).is_file():
            raise FileNotFoundError(
                f"'{self.path}' is not a complete feature cache (no {INDEX}); build it with "
                "`metamorph cache-features`"
            )
        saved = json.loads((self.path / CONFIG).read_text())
        self.predicted_by: str | None = saved.get("predicted_by")
        if self.predicted_by is not None and not allow_predicted:
            raise ValueError(
                f"feature cache '{self.path}' holds tokens predicted by the model at "
                f"'{self.predicted_by}', not the encoder's tokens of its images; only the "
                "decoder recipe trains on such a cache. Use a cache made with `metamorph "
                "cache-features --encoder ...` here"
            )
        own = {k: v for k, v in saved.items() if k not in ("dtype", "predicted_by")}
        _check_signature(own, encoder_signature(encoder), self.path)
        self.index = json.loads((self.path / INDEX).read_text())
        self._open: dict[str, Any] = {}

    def __getstate__(self) -> dict[str, Any]:
        # the open shard files stay behind (a loader worker opens its own)
        return {**self.__dict__, "_open": {}}

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
