"""The generation loop: per step one backbone forward for every row (on a KV cache, or the
whole sequence recomputed), then each sample takes a visual token, the forced
``<image_end>`` or a text token. Shapes: ``r`` rows (samples, then their unconditional rows),
``l`` sequence length, ``d`` backbone width, ``n`` visual tokens per image, ``c`` their width.
"""

from __future__ import annotations

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
from metamorph_core.generation.rows import Rows
from metamorph_core.generation.sampling import choose_tokens, make_generators
from metamorph_core.generation.static_cache import STATIC_CACHE_MIN, bucket, check_cache


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

    def _rows(self, prompts: Sequence[EncodedPrompt], limits: Sequence[int]) -> Rows:
        rows = [p.sample for p in prompts]
        rows += [p.unconditional for p in prompts if p.unconditional is not None and self.guided]
        embeds, mask = embed_prompts(self.model, rows)
        c = self.config
        static = most = None
        if c.cache_implementation == "static":
            pairs = list(zip(prompts, limits, strict=True))
            most = bucket(
                mask.shape[1] + max(self._room(len(p.sample.input_ids), k) for p, k in pairs),
                STATIC_CACHE_MIN,
            )
            # first the text budget and one image; doubled when a batch outgrows it
            likely = max(
                min(self._room(len(p.sample.input_ids), k), k + self.n + 1) for p, k in pairs
            )
            static = min(bucket(mask.shape[1] + likely, STATIC_CACHE_MIN), most)
        return Rows(self.model.backbone, embeds, mask, c.use_cache, static, c.compile, most)

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
