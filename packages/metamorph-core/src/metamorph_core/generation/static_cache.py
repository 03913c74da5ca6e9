"""Static KV caches for the generation loop: the same cache shapes every step, pooled between
batches, and the per-token step compiled once per shape (CUDA graphs on a GPU)."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import Any

from metamorph_core.generation.config import GenerationConfig
from metamorph_core.generation.protocol import GenerativeModel

#: each backbone class's compiled forward, called with the backbone as its first argument
#: (compiled graphs are cached by torch per backbone and shape; holding the class, not the
#: instance, keeps a dropped model collectable)
_COMPILED: dict[type, Callable[..., Any]] = {}


def compiled_step(backbone: Any) -> Callable[..., Any]:
    """``type(backbone).forward`` through ``torch.compile(mode="reduce-overhead")``: on CUDA,
    each shape (batch bucket, cache length) is captured as a CUDA graph once and replayed (the
    static caches are pooled, :class:`CachePool`, so their addresses stay the same). Allows
    dynamo :data:`COMPILED_SHAPES` shapes of it (its default is 8), as a server meets many."""
    kind = type(backbone)
    if kind not in _COMPILED:
        import torch._dynamo

        config = torch._dynamo.config
        config.cache_size_limit = max(config.cache_size_limit, COMPILED_SHAPES)
        _COMPILED[kind] = torch.compile(kind.forward, mode="reduce-overhead")
    return _COMPILED[kind]


class CachePool:
    """Static caches kept per backbone and shape (rows, length, device, dtype) between
    batches: a batch takes one (reset: zeroed in place) and gives it back when it ends, so a
    compiled step meets the same buffers again and replays its CUDA graph instead of
    recording a new one. The caches stay allocated while the backbone lives."""

    def __init__(self) -> None:
        self._free: weakref.WeakKeyDictionary[Any, dict[tuple[Any, ...], list[Any]]] = (
            weakref.WeakKeyDictionary()
        )
        self._lock = threading.Lock()

    @staticmethod
    def _key(backbone: Any, rows: int, length: int) -> tuple[Any, ...]:
        weight = next(backbone.parameters())
        return rows, length, weight.device, weight.dtype

    def take(self, backbone: Any, rows: int, length: int) -> Any:
        with self._lock:
            free = self._free.setdefault(backbone, {}).get(self._key(backbone, rows, length))
            cache = free.pop() if free else None
        if cache is None:
            return backbone.static_cache(length)
        cache.reset()
        return cache

    def give_back(self, backbone: Any, rows: int, length: int, cache: Any) -> None:
        with self._lock:
            pool = self._free.setdefault(backbone, {})
            pool.setdefault(self._key(backbone, rows, length), []).append(cache)


CACHE_POOL = CachePool()


#: static caches are allocated for a power of two of positions (at least this many), so that
#: batches of similar lengths share compiled graphs
STATIC_CACHE_MIN = 128
#: compiled shapes of the step allowed before dynamo falls back to eager
COMPILED_SHAPES = 64


def check_cache(model: GenerativeModel, config: GenerationConfig) -> None:
    """A :class:`ValueError` when ``config`` asks for a static cache that ``model``'s backbone
    does not have (a server checks it at start)."""
    from metamorph_core.interfaces import Backbone

    static = getattr(type(model.backbone), "static_cache", None)
    if config.cache_implementation == "static" and static is Backbone.static_cache:
        raise ValueError(
            f"backbone {type(model.backbone).__name__} has no static KV cache "
            "(Backbone.static_cache); generate with cache_implementation='dynamic'"
        )


def growable(cache: Any) -> bool:
    """Whether a static cache can be copied into a longer one: transformers' plain
    ``StaticLayer`` in every layer (a sliding window's buffer wraps around)."""
    return every_layer(cache, "StaticLayer")


def every_layer(cache: Any, kind: str) -> bool:
    """Whether every layer of ``cache`` is transformers' cache layer class ``kind`` exactly
    (not a subclass: sliding windows and quantised layers derive from the plain ones)."""
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer).__name__ == kind for layer in layers)


def bucket(n: int, least: int = 1) -> int:
    """The power of two at or above ``n`` (and ``least``)."""
    return max(least, 1 << max(n - 1, 0).bit_length())
