"""How to generate: :class:`GenerationConfig`, validated when it is made."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from metamorph_core.decoding import DecodeConfig

#: the KV caches generation can use
CACHES = ("dynamic", "static")


@dataclass(frozen=True)
class GenerationConfig:
    """How to generate. Invalid values raise ``ValueError`` when the config is made.

    ``max_new_tokens`` bounds the sampled text tokens of each sample (``<image_start>``
    included); an image once started always completes. ``do_sample=False`` is greedy; with
    ``do_sample=True`` the logits are divided by ``temperature`` and cut to the ``top_k`` most
    likely (``0``: no cut) and to the smallest set of probability ``top_p``; sample ``i`` draws
    from a generator seeded with ``seed + i`` (``None``: torch's global RNG). Generation of a
    sample stops at its EOS token or the template's end-of-turn token (unless ``ignore_eos``),
    or when its text contains one of the ``stop`` strings (the text is cut before it).
    ``visual_guidance_scale``: the LLM's classifier-free guidance on visual tokens, ``1.0`` off.
    ``decode_images``: turn each generated image into a PIL image with the attached decoder,
    sampled as ``decoding`` says: a :class:`~metamorph_core.decoding.DecodeConfig`
    (scheduler, steps, the decoder's own ``guidance_scale`` on pixels, seed), a dict of some of
    its fields over the decoder's own default sampling, or ``None`` for that default; each
    image is decoded on its own as it completes, so its pixels do not depend on the batch.
    ``use_cache=False`` recomputes the whole sequence at every step (for reference and
    benchmarks only: same results, much slower).

    ``cache_implementation="static"`` allocates the KV cache for a fixed number of positions,
    so that every step has the same shapes: the prompts, the text budget and one image,
    rounded up to a power of two, doubled when a batch outgrows it (up to what it can reach:
    every text token may open an image), or that most from the start when a layer has a
    sliding window. The rows are padded to a power of two, and the caches are kept for the
    next batch of the same shape. ``compile=True`` then runs the per-token step through
    ``torch.compile(mode="reduce-overhead")``: on a GPU the step is captured as a CUDA graph
    once per batch bucket and cache length and replayed, instead of launching each kernel from
    Python. A static batch takes no newcomers (continuous batching waits for it
    to end). Same results as the dynamic cache.
    """

    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    visual_guidance_scale: float = 1.0
    decode_images: bool = False
    decoding: DecodeConfig | dict[str, Any] | None = None
    use_cache: bool = True
    cache_implementation: str = "dynamic"
    compile: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        if isinstance(self.decoding, dict):  # checked now, applied over the decoder's default
            DecodeConfig.of(None, **self.decoding)
            object.__setattr__(self, "decoding", dict(self.decoding))
        elif self.decoding is not None and not isinstance(self.decoding, DecodeConfig):
            raise ValueError(
                f"decoding must be a DecodeConfig, a dict of its fields or None, got "
                f"{self.decoding!r}"
            )
        checks = [
            (
                isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1,
                f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}",
            ),
            (
                self.temperature > 0 or not self.do_sample,
                f"temperature must be > 0 when sampling, got {self.temperature}; for greedy "
                "decoding leave do_sample False",
            ),
            (
                isinstance(self.top_k, int) and self.top_k >= 0,
                f"top_k must be an integer >= 0 (0: no cut), got {self.top_k!r}",
            ),
            (0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}"),
            (
                self.seed is None or isinstance(self.seed, int),
                f"seed must be an integer or None, got {self.seed!r}",
            ),
            (
                all(isinstance(s, str) and s for s in self.stop),
                f"stop strings must be non-empty strings, got {self.stop!r}",
            ),
            (
                self.visual_guidance_scale >= 0,
                "visual_guidance_scale must be >= 0 (1.0: no guidance), got "
                f"{self.visual_guidance_scale}",
            ),
            (
                self.cache_implementation in CACHES,
                f"cache_implementation must be one of {CACHES}, got {self.cache_implementation!r}",
            ),
            (
                self.use_cache or self.cache_implementation == "dynamic",
                "cache_implementation='static' needs use_cache=True",
            ),
            (
                not self.compile or self.cache_implementation == "static",
                "compile=True compiles the step on a static cache; set "
                "cache_implementation='static' (and use_cache=True)",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        greedy_only = {"temperature": 1.0, "top_k": 0, "top_p": 1.0}
        changed = [k for k, v in greedy_only.items() if getattr(self, k) != v]
        if not self.do_sample and changed:
            verb = "applies" if len(changed) == 1 else "apply"
            raise ValueError(
                f"{', '.join(changed)} only {verb} when sampling, but do_sample is False "
                "(greedy decoding); set do_sample=True or leave the default"
            )


# names of earlier versions -> what replaced them
RENAMED = {
    "guidance_scale": "visual_guidance_scale (the LLM's guidance on visual tokens; the "
    "decoder's guidance on pixels is decoding=DecodeConfig(guidance_scale=...))",
    "decode_kwargs": "decoding (a DecodeConfig, or a dict of its fields)",
}


def check_options(options: dict[str, Any]) -> None:
    """Raise for keyword options that are not :class:`GenerationConfig` fields, naming what
    replaced a renamed one."""
    for old, new in RENAMED.items():
        if old in options:
            raise ValueError(f"generation option '{old}' is now {new}")
    known = set(GenerationConfig.__dataclass_fields__)
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"unknown generation option(s) {unknown}; known: {sorted(known)}")
