"""How a visual decoder samples pixels: :class:`DecodeConfig`, the typed options of
:meth:`metamorph_core.interfaces.VisualDecoder.decode`.

The fields are those of classifier-free-guided diffusion sampling, which every decoder we ship
uses. A decoder with more options subclasses :class:`DecodeConfig` and documents the subclass.
``guidance_scale`` is the *decoder's* guidance on pixels; the LLM's guidance on visual tokens is
:attr:`metamorph_core.generation.GenerationConfig.visual_guidance_scale`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class DecodeConfig:
    """``scheduler``: a sampler name the decoder knows (``sd-unet``: ``ddim``, ``ddpm``,
    ``pndm``, ``euler``, ``dpm-solver++``, ``unipc``...); ``steps``: denoising steps;
    ``guidance_scale``: classifier-free guidance on pixels (``1.0``: the conditional branch
    only); ``seed``: the initial noise (``None``: torch's global RNG)."""

    scheduler: str = "ddim"
    steps: int = 50
    guidance_scale: float = 7.5
    seed: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"decoder steps must be an integer >= 1, got {self.steps!r}")
        if not self.guidance_scale >= 0:
            raise ValueError(
                f"decoder guidance_scale must be >= 0 (1.0: no guidance), got {self.guidance_scale}"
            )
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"decoder seed must be an integer or None, got {self.seed!r}")

    @classmethod
    def of(cls, value: DecodeConfig | dict[str, Any] | None, **overrides: Any) -> DecodeConfig:
        """``value`` (a config, a mapping of its fields, or ``None`` for the defaults) with
        ``overrides``; an unknown field is an error naming the known ones."""
        if isinstance(value, DecodeConfig):
            base, fields = value, {}
        elif value is None:
            base, fields = cls(), {}
        elif isinstance(value, dict):
            base, fields = cls(), dict(value)
        else:
            raise TypeError(f"decoder options must be a DecodeConfig or a dict, got {value!r}")
        fields.update(overrides)
        known = {f.name for f in dataclasses.fields(base)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ValueError(
                f"unknown decoder option(s) {unknown}; {type(base).__name__} has {sorted(known)}"
            )
        return dataclasses.replace(base, **fields)
