"""The generation loop: per step one backbone forward for every row (on a KV cache, or the
whole sequence recomputed), then each sample takes a visual token, the forced
``<image_end>`` or a text token. Shapes: ``r`` rows (samples, then their unconditional rows),
``l`` sequence length, ``d`` backbone width, ``n`` visual tokens per image, ``c`` their width.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
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
    sequence recomputed at every step. Finished rows keep a place (masked, position frozen)."""

    def __init__(
        self, backbone: Any, embeds: torch.Tensor, mask: torch.Tensor, use_cache: bool
    ) -> None:
        self.backbone, self.use_cache = backbone, use_cache
        self.mask = mask  # (r, l) long
        self.positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (r, l)
        self.next_position = self.positions[:, -1] + 1  # (r,)
        self.embeds = embeds  # (r, l, d); only the last step's when cached
        self.cache: Any = None

    def prefill(self) -> torch.Tensor:
        """Run the prompts; ``(r, d)`` hidden states at their last positions."""
        out = self.backbone(
            self.embeds,
            attention_mask=self.mask,
            position_ids=self.positions,
            use_cache=self.use_cache,
        )
        self.cache = out.cache
        return out.hidden_states[:, -1]

    def step(self, embeds: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
        """Append one input per row (``(r, d)`` embeddings; rows not ``alive`` are masked)."""
        position = self.next_position[:, None]
        self.mask = torch.cat([self.mask, alive[:, None].to(self.mask.dtype)], dim=1)
        self.next_position = self.next_position + alive.long()
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


def _check_room(model: GenerativeModel, prompts: Sequence[EncodedPrompt], force_image: bool) -> int:
    """The context length; raise if a prompt leaves no room to generate."""
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


def stream_encoded(
    model: GenerativeModel,
    prompts: Sequence[EncodedPrompt],
    config: GenerationConfig,
    force_image: bool = False,
    *,
    max_new_tokens: Sequence[int] | None = None,
    should_stop: Callable[[int], bool] | None = None,
) -> Iterator[GenerationEvent]:
    """The generation loop on encoded prompts (from :func:`encode_prompts`, or built by hand
    from token ids as :class:`EncodedSample`). ``force_image``: every prompt ends with
    ``<image_start>`` and each sample stops after its image. ``max_new_tokens``: one limit
    per prompt instead of ``config.max_new_tokens`` (a server batching requests).
    ``should_stop(i)``, asked for every unfinished sample before each step, ends sample ``i``
    there with finish reason ``"cancelled"`` (a client gone, a deadline passed); the others go
    on. Bad input raises here, before the first event."""
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
    if config.visual_guidance_scale != 1.0 and any(p.unconditional is None for p in prompts):
        raise ValueError(
            f"visual_guidance_scale={config.visual_guidance_scale} needs every prompt's "
            "unconditional input; "
            "encode the prompts with encode_prompts(..., config) under the same config"
        )
    with torch.no_grad():
        loop = _Loop(model, prompts, config, force_image)
        loop.limits = list(max_new_tokens or [config.max_new_tokens] * len(prompts))
        loop.should_stop = should_stop
        return loop.run()


class _Loop:
    """One batched generation: per step, one backbone forward for all rows, then each sample
    takes a visual token, the forced ``<image_end>`` or a text token."""

    def __init__(
        self,
        model: GenerativeModel,
        prompts: Sequence[EncodedPrompt],
        config: GenerationConfig,
        force_image: bool,
    ) -> None:
        self.model, self.config, self.force_image = model, config, force_image
        self.limit = _check_room(model, prompts, force_image)
        self.b, self.n = len(prompts), model.num_image_tokens
        self.guided = config.visual_guidance_scale != 1.0
        builder, backbone = model.sequence_builder, model.backbone
        self.device = next(backbone.parameters()).device
        self.stop_ids = set() if config.ignore_eos else _stop_ids(model)
        vocab = backbone.tokenizer.get_vocab()
        template_stops = () if config.ignore_eos else builder.template.stop
        stops = (*config.stop, *(s for s in template_stops if s not in vocab))
        self.samples = [
            _Sample(IncrementalText(backbone.tokenizer, stops), len(p.sample.input_ids))
            for p in prompts
        ]
        if force_image:  # the prompt ends with <image_start>: the image is the answer's start
            for s in self.samples:
                s.remaining = self.n + 1
                s.ids.append(builder.image_start_id)
        self.generators = (
            make_generators(config.seed, self.b, self.device) if config.do_sample else []
        )
        rows = [p.sample for p in prompts]
        rows += [p.unconditional for p in prompts if p.unconditional is not None and self.guided]
        embeds, mask = embed_prompts(model, rows)
        self.rows = _Rows(backbone, embeds, mask, config.use_cache)
        self.limits = [config.max_new_tokens] * self.b  # per sample
        self.should_stop: Callable[[int], bool] | None = None

    @torch.no_grad()
    def run(self) -> Iterator[GenerationEvent]:
        model, builder = self.model, self.model.sequence_builder
        pad = model.backbone.embed(torch.tensor([builder.pad_id], device=self.device))[0]
        hidden = self.rows.prefill()  # (r, d)
        if self.force_image:
            yield from (TextEvent(i, s.text.push_image()) for i, s in enumerate(self.samples))
        while True:
            events: list[GenerationEvent] = []
            next_ids = [builder.pad_id] * self.b
            live = [i for i, s in enumerate(self.samples) if s.finish_reason is None]
            if self.should_stop is not None:
                for i in [i for i in live if self.should_stop(i)]:
                    s = self.samples[i]
                    s.finish_reason = "cancelled"
                    events += [TextEvent(i, s.text.finish()), DoneEvent(i, _result(s))]
                    live.remove(i)
            visual = [i for i in live if self.samples[i].remaining > 1]
            text = [i for i in live if self.samples[i].remaining == 0]
            proj = None
            if visual:
                idx = torch.tensor(visual, device=self.device)
                pred = self._visual_tokens(hidden, idx)  # (v, c)
                proj = model.project_visual(pred)  # (v, d)
                events += self._take_visual(visual, pred)
            for i in live:
                if self.samples[i].remaining == 1:
                    next_ids[i] = self._end_image(self.samples[i])
            if text:
                logits = model.backbone.logits(hidden[torch.tensor(text, device=self.device)])
                events += self._take_text(text, logits, next_ids)
            for i in live:
                s = self.samples[i]
                full = s.sampled >= self.limits[i] or s.length >= self.limit
                if s.finish_reason is None and s.remaining == 0 and full:
                    s.finish_reason = "length"
                if s.finish_reason is not None:
                    events += [TextEvent(i, s.text.finish()), DoneEvent(i, _result(s))]
            yield from (e for e in events if not isinstance(e, TextEvent) or e.text)

            alive = [s.finish_reason is None for s in self.samples]
            if not any(alive):
                return
            step = model.backbone.embed(torch.tensor(next_ids, device=self.device))  # (b, d)
            if proj is not None:
                step[torch.tensor(visual, device=self.device)] = proj.to(step.dtype)
            alive_t = torch.tensor(alive, device=self.device)
            step = torch.where(alive_t[:, None], step, pad)
            if self.guided:  # the unconditional rows take the same inputs
                step, alive_t = torch.cat([step, step]), torch.cat([alive_t, alive_t])
            hidden = self.rows.step(step, alive_t)

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
        for i, token in zip(visual, pred, strict=True):
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
        gens = [self.generators[i] for i in text] if c.do_sample else ()
        chosen = choose_tokens(logits, c.do_sample, c.temperature, c.top_k, c.top_p, gens)
        start_id = self.model.sequence_builder.image_start_id
        events: list[GenerationEvent] = []
        for i, token in zip(text, chosen.tolist(), strict=True):
            s = self.samples[i]
            s.sampled += 1
            if token == start_id and s.length + self.n + 2 > self.limit:
                s.finish_reason = "length"  # the image and <image_end> would not fit
                continue
            s.ids.append(token)
            s.length += 1
            next_ids[i] = token
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
