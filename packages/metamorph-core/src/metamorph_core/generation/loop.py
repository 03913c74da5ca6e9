"""The generation loop: per step one backbone forward for every row (on a KV cache, or the
whole sequence recomputed), then each sample takes a visual token, the forced
``<image_end>`` or a text token. Shapes: ``r`` rows (samples, then their unconditional rows),
``l`` sequence length, ``d`` backbone width, ``n`` visual tokens per image, ``c`` their width.
"""

from __future__ import annotations

import functools
import threading
import weakref
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from metamorph_core.errors import ConversationError
from metamorph_core.generation.config import GenerationConfig
from metamorph_core.generation.detokenize import IncrementalText
from metamorph_core.generation.outputs import (
    DoneEvent,
    GenerationEvent,
    GenerationResult,
    ImageEvent,
    TextEvent,
)
from metamorph_core.generation.prompts import EncodedPrompt, embed_prompts
from metamorph_core.generation.protocol import GenerativeModel
from metamorph_core.generation.sampling import choose_tokens, make_generators


@dataclass
class _Sample:
    """One sample's progress."""

    text: IncrementalText
    length: int  # the sequence so far: prompt and every output, text and visual
    ids: list[int] = field(default_factory=list)
    images: list[torch.Tensor] = field(default_factory=list)
    pil_images: list[Any] = field(default_factory=list)
    visual: list[torch.Tensor] = field(default_factory=list)  # the image being generated
    remaining: int = 0  # outputs left in image mode: visual tokens, then the forced <image_end>
    sampled: int = 0  # text tokens sampled so far
    finish_reason: str | None = None


class _Rows:
    """The batch's sequences on the backbone: a KV cache, or (``use_cache=False``) the whole
    sequence recomputed at every step. Finished rows keep a place (masked, position frozen)
    unless :meth:`keep` drops them; :meth:`merge` adds prefilled rows (joining mid-generation).
    ``static_length``: the cache is allocated for that many positions and every step sees the
    whole ``(r, static_length)`` mask (same shapes each step); when the batch outgrows it, a
    cache of twice the length (at most ``static_max``) takes its place — a new shape, so a new
    compiled graph — unless a layer is a sliding window, whose cache is allocated at
    ``static_max`` from the start; the rows are padded to
    a power of two with copies of the last one (their outputs dropped), so that batches of
    nearby sizes share a compiled graph. ``compiled``: the steps run through the backbone's
    compiled forward (:func:`_compiled_step`).
    """

    def __init__(
        self,
        backbone: Any,
        embeds: torch.Tensor,
        mask: torch.Tensor,
        use_cache: bool,
        static_length: int | None = None,
        compiled: bool = False,
        static_max: int | None = None,
    ) -> None:
        self.backbone, self.use_cache = backbone, use_cache
        self.mask = mask  # (r, l) long
        self.positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (r, l)
        self.next_position = self.positions[:, -1] + 1  # (r,)
        self.embeds = embeds  # (r, l, d); only the last step's when cached
        self.cache: Any = None
        self.static_length = static_length
        self.static_max = static_max if static_max is not None else static_length
        self.static_mask: torch.Tensor | None = None  # (rows padded, static_length)
        self.extra = 0  # the padding rows of a static batch
        self.compiled = compiled
        self.forward_step = (
            functools.partial(_compiled_step(backbone), backbone) if compiled else backbone
        )

    def prefill(self) -> torch.Tensor:
        """Run the prompts; ``(r, d)`` hidden states at their last positions."""
        cache = None
        embeds, mask, positions = self.embeds, self.mask, self.positions
        if self.static_length is not None:
            r, width = self.mask.shape
            self.extra = _bucket(r) - r
            cache = _CACHES.take(self.backbone, r + self.extra, self.static_length)
            if not _growable(cache):
                _CACHES.give_back(self.backbone, r + self.extra, self.static_length, cache)
                self.static_length = self.static_max
                cache = _CACHES.take(self.backbone, r + self.extra, self.static_length)
            embeds, mask, positions = (self._pad(x) for x in (embeds, mask, positions))
            self.static_mask = mask.new_zeros(r + self.extra, self.static_length)
            self.static_mask[:, :width] = mask
        out = self.backbone(
            embeds,
            attention_mask=mask,
            position_ids=positions,
            cache=cache,
            use_cache=self.use_cache,
        )
        self.cache = cache if cache is not None else out.cache
        return out.hidden_states[: len(self.mask), -1]

    def _grow(self) -> None:
        """A static cache (and mask) of twice the length holding this one's positions."""
        assert self.static_mask is not None
        length = min(2 * self.static_length, self.static_max)
        if length <= self.static_length:
            raise RuntimeError("a static batch outgrew the longest it could reach")
        rows = len(self.static_mask)
        cache = _CACHES.take(self.backbone, rows, length)
        for new, old in zip(cache.layers, self.cache.layers, strict=True):
            if not new.is_initialized:
                new.lazy_initialization(old.keys, old.values)
            new.keys[:, :, : self.static_length].copy_(old.keys)
            new.values[:, :, : self.static_length].copy_(old.values)
            new.cumulative_length.copy_(old.cumulative_length)
        _CACHES.give_back(self.backbone, rows, self.static_length, self.cache)
        mask = self.static_mask.new_zeros(rows, length)
        mask[:, : self.static_length] = self.static_mask
        self.cache, self.static_mask, self.static_length = cache, mask, length

    def release(self) -> None:
        """Hand a static cache back for the next batch of its shape."""
        if self.static_mask is not None and self.cache is not None:
            _CACHES.give_back(self.backbone, len(self.static_mask), self.static_length, self.cache)
            self.cache = None

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` with the static batch's padding rows (copies of its last row)."""
        if not self.extra:
            return x
        return torch.cat([x, x[-1:].expand(self.extra, *x.shape[1:])])

    def step(self, embeds: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
        """Append one input per row (``(r, d)`` embeddings; rows not ``alive`` are masked)."""
        position = self.next_position[:, None]
        column = self.mask.shape[1]
        self.mask = torch.cat([self.mask, alive[:, None].to(self.mask.dtype)], dim=1)
        self.next_position = self.next_position + alive.long()
        if self.static_mask is not None:  # the cache keeps its object until it grows
            if column >= self.static_length:
                self._grow()
            self.static_mask[:, column] = self._pad(alive).to(self.static_mask.dtype)
            out = self.forward_step(
                self._pad(embeds)[:, None],
                attention_mask=self.static_mask,
                position_ids=self._pad(position),
                cache=self.cache,
                use_cache=True,
            )
            hidden = out.hidden_states[: len(self.mask), -1]
            # a CUDA graph's next replay overwrites its outputs
            return hidden.clone() if self.compiled else hidden
        if self.use_cache:
            out = self.backbone(
                embeds[:, None],
                attention_mask=self.mask,
                position_ids=position,
                cache=self.cache,
                use_cache=True,
            )
            self.cache = out.cache
        else:
            self.embeds = torch.cat([self.embeds, embeds[:, None]], dim=1)
            self.positions = torch.cat([self.positions, position], dim=1)
            out = self.backbone(self.embeds, attention_mask=self.mask, position_ids=self.positions)
        return out.hidden_states[:, -1]

    def resizable(self) -> bool:
        """Whether rows can be added and dropped: the whole-sequence path, or a cache whose
        every layer is transformers' plain growing key/value store (not a sliding window, a
        quantised or a static cache)."""
        return not self.use_cache or _every_layer(self.cache, "DynamicLayer")

    def merge(self, other: _Rows, order: torch.Tensor) -> None:
        """Add ``other``'s prefilled rows: both left-padded to the longer sequence (padding
        masked), then every row put in ``order`` (indices into these rows, then other's)."""
        la, lb = self.mask.shape[1], other.mask.shape[1]
        width = max(la, lb)

        def both(a: torch.Tensor, b: torch.Tensor, dim: int) -> torch.Tensor:
            return torch.cat([_left_pad(a, dim, width - la), _left_pad(b, dim, width - lb)])[order]

        self.mask = both(self.mask, other.mask, 1)
        self.next_position = torch.cat([self.next_position, other.next_position])[order]
        if self.use_cache:
            for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
                mine.keys = both(mine.keys, theirs.keys, 2)
                mine.values = both(mine.values, theirs.values, 2)
        else:
            self.embeds = both(self.embeds, other.embeds, 1)
            self.positions = both(self.positions, other.positions, 1)

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` (indices, in their new order), and drop the leading columns that
        none of them attends to."""
        self.mask, self.next_position = self.mask[rows], self.next_position[rows]
        first = int(self.mask.any(dim=0).long().argmax())
        self.mask = self.mask[:, first:]
        if self.use_cache:
            for layer in self.cache.layers:
                layer.keys = layer.keys[rows, :, first:]
                layer.values = layer.values[rows, :, first:]
        else:
            self.embeds = self.embeds[rows, first:]
            self.positions = self.positions[rows, first:]


#: each backbone class's compiled forward, called with the backbone as its first argument
#: (compiled graphs are cached by torch per backbone and shape; holding the class, not the
#: instance, keeps a dropped model collectable)
_COMPILED: dict[type, Callable[..., Any]] = {}


def _compiled_step(backbone: Any) -> Callable[..., Any]:
    """``type(backbone).forward`` through ``torch.compile(mode="reduce-overhead")``: on CUDA,
    each shape (batch bucket, cache length) is captured as a CUDA graph once and replayed (the
    static caches are pooled, :class:`_CachePool`, so their addresses stay the same). Allows
    dynamo :data:`COMPILED_SHAPES` shapes of it (its default is 8), as a server meets many."""
    kind = type(backbone)
    if kind not in _COMPILED:
        import torch._dynamo

        config = torch._dynamo.config
        config.cache_size_limit = max(config.cache_size_limit, COMPILED_SHAPES)
        _COMPILED[kind] = torch.compile(kind.forward, mode="reduce-overhead")
    return _COMPILED[kind]


class _CachePool:
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


_CACHES = _CachePool()


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


def _growable(cache: Any) -> bool:
    """Whether a static cache can be copied into a longer one: transformers' plain
    ``StaticLayer`` in every layer (a sliding window's buffer wraps around)."""
    return _every_layer(cache, "StaticLayer")


def _every_layer(cache: Any, kind: str) -> bool:
    """Whether every layer of ``cache`` is transformers' cache layer class ``kind`` exactly
    (not a subclass: sliding windows and quantised layers derive from the plain ones)."""
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer).__name__ == kind for layer in layers)


def _bucket(n: int, least: int = 1) -> int:
    """The power of two at or above ``n`` (and ``least``)."""
    return max(least, 1 << max(n - 1, 0).bit_length())


def _left_pad(x: torch.Tensor, dim: int, n: int) -> torch.Tensor:
    if n == 0:
        return x
    shape = list(x.shape)
    shape[dim] = n
    return torch.cat([x.new_zeros(shape), x], dim=dim)


def check_room(model: GenerativeModel, prompts: Sequence[EncodedPrompt], force_image: bool) -> int:
    """The context length; a :class:`~metamorph_core.errors.ConversationError` naming the prompt
    when one leaves no room to generate (a server checks each request with it before
    batching)."""
    limit = model.sequence_builder.max_length or 1 << 62
    need = model.num_image_tokens + 1 if force_image else 1  # the image and <image_end>, or a token
    for i, p in enumerate(prompts):
        for s in (p.sample, p.unconditional):
            if s is not None and len(s.input_ids) + need > limit:
                raise ConversationError(
                    f"prompt {i} ({s.id!r}) takes {len(s.input_ids)} tokens with the chat "
                    f"template and its images, and generating needs {need} more, but the "
                    f"context holds {limit} (the backbone's maximum or MetaMorphConfig."
                    "max_length); shorten the prompt or use fewer prompt images"
                )
    return limit


def _stop_ids(model: GenerativeModel) -> set[int]:
    """EOS and the template's end-of-turn tokens (those stop strings that are one token)."""
    tok = model.backbone.tokenizer
    ids = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    vocab = tok.get_vocab()
    ids |= {vocab[s] for s in model.sequence_builder.template.stop if s in vocab}
    return ids


#: what ``admit`` hands the loop: prompts to join, each with its own token budget
Admission = Sequence[tuple[EncodedPrompt, int]]


def stream_encoded(
    model: GenerativeModel,
    prompts: Sequence[EncodedPrompt],
    config: GenerationConfig,
    force_image: bool = False,
    *,
    max_new_tokens: Sequence[int] | None = None,
    should_stop: Callable[[int], bool] | None = None,
    admit: Callable[[int], Admission] | None = None,
) -> Iterator[GenerationEvent]:
    """The generation loop on encoded prompts (from :func:`encode_prompts`, or built by hand
    from token ids as :class:`EncodedSample`). ``force_image``: every prompt ends with
    ``<image_start>`` and each sample stops after its image. ``max_new_tokens``: one limit
    per prompt instead of ``config.max_new_tokens`` (a server batching requests).
    ``should_stop(i)``, asked for every unfinished sample before each step, ends sample ``i``
    there with finish reason ``"cancelled"`` (a client gone, a deadline passed); the others go
    on. Bad input raises here, before the first event.

    ``admit(running)`` (continuous batching): called between steps with the number of samples
    still running, it returns prompts to join now (with their token budgets; an empty list:
    none), generated under the same ``config`` and ``force_image``. Each is prefilled and
    joins the batch at the next step; the new samples take the next indices (``len(prompts)``,
    then on), and finished rows leave the batch. The loop ends when nothing runs and ``admit``
    gives nothing. Joining needs a cache that can grow and shrink by rows (transformers'
    dynamic cache, or ``use_cache=False``); on any other cache ``admit`` is not called."""
    if not prompts:
        raise ValueError("generation needs at least one prompt")
    if max_new_tokens is not None and (
        len(max_new_tokens) != len(prompts)
        or not all(isinstance(m, int) and m >= 1 for m in max_new_tokens)
    ):
        raise ValueError(
            f"max_new_tokens must hold one integer >= 1 per prompt ({len(prompts)}), got "
            f"{list(max_new_tokens)!r}"
        )
    if config.decode_images:
        model.require_decoder()
    check_cache(model, config)
    _check_guidance(prompts, config)
    with torch.no_grad():
        limits = list(max_new_tokens or [config.max_new_tokens] * len(prompts))
        loop = _Loop(model, prompts, limits, config, force_image)
        loop.should_stop, loop.admit = should_stop, admit
        return loop.run()


def _check_guidance(prompts: Sequence[EncodedPrompt], config: GenerationConfig) -> None:
    if config.visual_guidance_scale != 1.0 and any(p.unconditional is None for p in prompts):
        raise ValueError(
            f"visual_guidance_scale={config.visual_guidance_scale} needs every prompt's "
            "unconditional input; "
            "encode the prompts with encode_prompts(..., config) under the same config"
        )


class _Loop:
    """One batched generation: per step, one backbone forward for all rows, then each sample
    takes a visual token, the forced ``<image_end>`` or a text token. Row ``k`` of the batch
    holds sample ``order[k]``; under guidance rows ``b + k`` are the unconditional ones."""

    def __init__(
        self,
        model: GenerativeModel,
        prompts: Sequence[EncodedPrompt],
        limits: list[int],
        config: GenerationConfig,
        force_image: bool,
    ) -> None:
        self.model, self.config, self.force_image = model, config, force_image
        self.limit = check_room(model, prompts, force_image)
        self.n = model.num_image_tokens
        self.guided = config.visual_guidance_scale != 1.0
        builder, backbone = model.sequence_builder, model.backbone
        self.device = next(backbone.parameters()).device
        self.stop_ids = set() if config.ignore_eos else _stop_ids(model)
        vocab = backbone.tokenizer.get_vocab()
        template_stops = () if config.ignore_eos else builder.template.stop
        self.stops = (*config.stop, *(s for s in template_stops if s not in vocab))
        self.samples: list[_Sample] = []
        self.limits: list[int] = []  # per sample
        self.generators: list[torch.Generator | None] = []  # per sample, when sampling
        self.order = self._add_samples(prompts, limits)
        self.rows = self._rows(prompts, limits)
        self.should_stop: Callable[[int], bool] | None = None
        self.admit: Callable[[int], Admission] | None = None

    @property
    def b(self) -> int:
        return len(self.order)

    def _add_samples(self, prompts: Sequence[EncodedPrompt], limits: Sequence[int]) -> list[int]:
        """Start a sample per prompt; their indices."""
        first, tokenizer = len(self.samples), self.model.backbone.tokenizer
        for p, limit in zip(prompts, limits, strict=True):
            s = _Sample(IncrementalText(tokenizer, self.stops), len(p.sample.input_ids))
            if self.force_image:  # the prompt ends with <image_start>: the image starts the answer
                s.remaining = self.n + 1
                s.ids.append(self.model.sequence_builder.image_start_id)
            self.samples.append(s)
            self.limits.append(limit)
        if self.config.do_sample:  # sample i draws from seed + i
            seed = self.config.seed
            start = None if seed is None else seed + first
            self.generators += make_generators(start, len(prompts), self.device)
        return list(range(first, len(self.samples)))

    def _rows(self, prompts: Sequence[EncodedPrompt], limits: Sequence[int]) -> _Rows:
        rows = [p.sample for p in prompts]
        rows += [p.unconditional for p in prompts if p.unconditional is not None and self.guided]
        embeds, mask = embed_prompts(self.model, rows)
        c = self.config
        static = most = None
        if c.cache_implementation == "static":
            pairs = list(zip(prompts, limits, strict=True))
            most = _bucket(
                mask.shape[1] + max(self._room(len(p.sample.input_ids), k) for p, k in pairs),
                STATIC_CACHE_MIN,
            )
            # first the text budget and one image; doubled when a batch outgrows it
            likely = max(
                min(self._room(len(p.sample.input_ids), k), k + self.n + 1) for p, k in pairs
            )
            static = min(_bucket(mask.shape[1] + likely, STATIC_CACHE_MIN), most)
        return _Rows(self.model.backbone, embeds, mask, c.use_cache, static, c.compile, most)

    def _room(self, prompt_length: int, limit: int) -> int:
        """The most positions a sample can add to its prompt: its image and ``<image_end>``
        when forced; else each of its ``limit`` text tokens may open an image (``n`` tokens and
        ``<image_end>`` more), within the context."""
        if self.force_image:
            return self.n + 1
        return min(limit * (self.n + 2), self.limit - prompt_length)

    def _pushed_images(self, samples: Sequence[int]) -> list[GenerationEvent]:
        if not self.force_image:
            return []
        return [TextEvent(i, self.samples[i].text.push_image()) for i in samples]

    @torch.no_grad()
    def run(self) -> Iterator[GenerationEvent]:
        try:
            yield from self._run()
        finally:  # also when the caller stops early or drops the generator
            self.rows.release()

    def _run(self) -> Iterator[GenerationEvent]:
        model, builder = self.model, self.model.sequence_builder
        pad = model.backbone.embed(torch.tensor([builder.pad_id], device=self.device))[0]
        hidden = self.rows.prefill()  # (r, d)
        yield from self._pushed_images(self.order)
        while True:
            events: list[GenerationEvent] = []
            samples, order = self.samples, self.order
            next_ids = [builder.pad_id] * self.b
            live = [k for k in range(self.b) if samples[order[k]].finish_reason is None]
            if self.should_stop is not None:
                for k in [k for k in live if self.should_stop(order[k])]:
                    s = samples[order[k]]
                    s.finish_reason = "cancelled"
                    events += [
                        TextEvent(order[k], s.text.finish()),
                        DoneEvent(order[k], _result(s)),
                    ]
                    live.remove(k)
            visual = [k for k in live if samples[order[k]].remaining > 1]
            text = [k for k in live if samples[order[k]].remaining == 0]
            proj = None
            if visual:
                idx = torch.tensor(visual, device=self.device)
                pred = self._visual_tokens(hidden, idx)  # (v, c)
                proj = model.project_visual(pred)  # (v, d)
                events += self._take_visual(visual, pred)
            for k in live:
                if samples[order[k]].remaining == 1:
                    next_ids[k] = self._end_image(samples[order[k]])
            if text:
                logits = model.backbone.logits(hidden[torch.tensor(text, device=self.device)])
                events += self._take_text(text, logits, next_ids)
            for k in live:
                i = order[k]
                s = samples[i]
                full = s.sampled >= self.limits[i] or s.length >= self.limit
                if s.finish_reason is None and s.remaining == 0 and full:
                    s.finish_reason = "length"
                if s.finish_reason is not None:
                    events += [TextEvent(i, s.text.finish()), DoneEvent(i, _result(s))]
            yield from (e for e in events if not isinstance(e, TextEvent) or e.text)

            alive = [samples[i].finish_reason is None for i in order]
            step = model.backbone.embed(torch.tensor(next_ids, device=self.device))  # (b, d)
            if proj is not None:
                step[torch.tensor(visual, device=self.device)] = proj.to(step.dtype)
            if self.admit is not None and self.rows.resizable():
                hidden = yield from self._continue(step, alive)
                if hidden is None:
                    return
                continue
            if not any(alive):
                return
            alive_t = torch.tensor(alive, device=self.device)
            step = torch.where(alive_t[:, None], step, pad)
            if self.guided:  # the unconditional rows take the same inputs
                step, alive_t = torch.cat([step, step]), torch.cat([alive_t, alive_t])
            hidden = self.rows.step(step, alive_t)

    def _continue(
        self, step: torch.Tensor, alive: list[bool]
    ) -> Generator[GenerationEvent, None, torch.Tensor | None]:
        """Continuous batching between two steps: finished rows leave, the running ones take
        their step, then the prompts ``admit`` hands over are prefilled and join. Returns the
        hidden states of the new batch (``None``: nothing runs any more)."""
        keep = [k for k in range(self.b) if alive[k]]
        hidden = None
        if keep:
            rows = keep + [k + self.b for k in keep] if self.guided else keep
            self.rows.keep(torch.tensor(rows, device=self.device))
            self.order = [self.order[k] for k in keep]
            step = step[torch.tensor(keep, device=self.device)]
            ones = torch.ones(len(rows), dtype=torch.bool, device=self.device)
            hidden = self.rows.step(torch.cat([step, step]) if self.guided else step, ones)
        admitted = list(self.admit(len(keep)))
        if not admitted:
            return hidden
        prompts = [p for p, _ in admitted]
        check_room(self.model, prompts, self.force_image)
        _check_guidance(prompts, self.config)
        joined = self._add_samples(prompts, [m for _, m in admitted])
        rows = self._rows(prompts, [m for _, m in admitted])
        new_hidden = rows.prefill()
        if hidden is None:  # nothing was running: the new prompts are the batch
            self.rows, self.order, hidden = rows, joined, new_hidden
        else:
            old, new = self.b, len(joined)
            r_old = hidden.shape[0]
            cond = [*range(old), *range(r_old, r_old + new)]
            uncond = [*range(old, r_old), *range(r_old + new, r_old + 2 * new)]
            order = torch.tensor(cond + uncond if self.guided else cond, device=self.device)
            self.rows.merge(rows, order)
            hidden = torch.cat([hidden, new_hidden])[order]
            self.order = self.order + joined
        yield from self._pushed_images(joined)
        return hidden

    def _visual_tokens(self, hidden: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """``(v, c)`` float32 tokens for rows ``idx``: the normalised head output or, under
        guidance, ``normalize(u + s * (c - u))`` of the conditional and unconditional ones."""
        pred = self.model.predict_visual_tokens(hidden[idx])
        if self.guided:
            uncond = self.model.predict_visual_tokens(hidden[idx + self.b])
            pred = F.normalize(uncond + self.config.visual_guidance_scale * (pred - uncond), dim=-1)
        return pred

    def _take_visual(self, visual: list[int], pred: torch.Tensor) -> list[GenerationEvent]:
        events: list[GenerationEvent] = []
        for k, token in zip(visual, pred, strict=True):
            i = self.order[k]
            s = self.samples[i]
            s.visual.append(token)
            s.remaining -= 1
            s.length += 1
            if len(s.visual) == self.n:  # complete: <image_end> comes next
                tokens = torch.stack(s.visual)
                image = self._decode(tokens) if self.config.decode_images else None
                s.images.append(tokens)
                if image is not None:
                    s.pil_images.append(image)
                s.visual = []
                events.append(ImageEvent(i, len(s.images) - 1, tokens, image))
        return events

    def _end_image(self, s: _Sample) -> int:
        end_id = self.model.sequence_builder.image_end_id
        s.ids.append(end_id)
        s.remaining = 0
        s.length += 1
        if self.force_image:
            s.finish_reason = "image"
        return end_id

    def _take_text(
        self, text: list[int], logits: torch.Tensor, next_ids: list[int]
    ) -> list[GenerationEvent]:
        c = self.config
        gens = [self.generators[self.order[k]] for k in text] if c.do_sample else ()
        chosen = choose_tokens(logits, c.do_sample, c.temperature, c.top_k, c.top_p, gens)
        start_id = self.model.sequence_builder.image_start_id
        events: list[GenerationEvent] = []
        for k, token in zip(text, chosen.tolist(), strict=True):
            i = self.order[k]
            s = self.samples[i]
            s.sampled += 1
            if token == start_id and s.length + self.n + 2 > self.limit:
                s.finish_reason = "length"  # the image and <image_end> would not fit
                continue
            s.ids.append(token)
            s.length += 1
            next_ids[k] = token
            if token in self.stop_ids:
                s.finish_reason = "stop"
                continue
            if token == start_id:
                s.remaining = self.n + 1
                events.append(TextEvent(i, s.text.push_image()))
            else:
                events.append(TextEvent(i, s.text.push(token)))
            if s.text.stopped:
                s.finish_reason = "stop"
        return events

    def _decode(self, tokens: torch.Tensor) -> Any:
        """``(n, c)`` tokens -> a PIL image through the attached decoder."""
        decoding = self.config.decoding
        if isinstance(decoding, dict):  # some fields over the decoder's own sampling
            pixels = self.model.decode_images(tokens[None], None, **decoding)
        else:
            pixels = self.model.decode_images(tokens[None], decoding)
        return to_pil(pixels[0])


def _result(s: _Sample) -> GenerationResult:
    return GenerationResult(s.text.text, s.ids, s.images, s.pil_images, s.finish_reason or "")


def to_pil(pixels: torch.Tensor) -> Any:
    """``(3, h, w)`` pixels in [0, 1] -> an RGB PIL image."""
    try:
        from PIL import Image
    except ImportError as e:  # pillow is not a core dependency
        raise ImportError(
            "decoded images are PIL images, which needs pillow: pip install pillow"
        ) from e
    arr = (pixels.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return Image.fromarray(arr.permute(1, 2, 0).cpu().numpy(), "RGB")
