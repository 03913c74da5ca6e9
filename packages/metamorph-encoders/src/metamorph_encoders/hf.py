"""``siglip`` and ``clip``: transformers vision towers as MetaMorph encoders.

``pretrained`` is a hub id or a local directory (a full SigLIP/CLIP checkpoint or a vision-only
one); ``config`` (a dict of the vision config's fields) builds a random model instead.
Preprocessing comes from the checkpoint's image processor, or from the family's defaults and
the config's image size when it has none. Default layers: SigLIP reads ``hidden_states[-1]``
(the last block, before ``post_layernorm``; the paper's choice), CLIP ``hidden_states[-2]``
(LLaVA's choice for CLIP).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, ClassVar

import torch

from metamorph_core.dtypes import resolve_dtype
from metamorph_core.errors import CheckpointError
from metamorph_encoders.base import GridEncoder
from metamorph_encoders.transforms import ImageTransform

logger = logging.getLogger("metamorph")


class HFVisionEncoder(GridEncoder):
    """Base for transformers vision towers; a family sets the class attributes below."""

    family: ClassVar[str]
    model_class: ClassVar[str]  # e.g. "SiglipVisionModel"
    config_class: ClassVar[str]  # e.g. "SiglipVisionConfig"
    default_layer: ClassVar[int] = -1
    prefix_tokens: ClassVar[int] = 0  # class token etc.; override _num_prefix_tokens if it varies
    fixed_resolution: ClassVar[bool] = True  # False: the model interpolates position embeddings
    # fallback preprocessing when a checkpoint has no image processor
    default_mean: ClassVar[tuple[float, float, float]] = (0.5, 0.5, 0.5)
    default_std: ClassVar[tuple[float, float, float]] = (0.5, 0.5, 0.5)
    default_interpolation: ClassVar[str] = "bicubic"
    # config fields set when loading (e.g. skip SigLIP's unused pooling head)
    load_overrides: ClassVar[dict[str, Any]] = {}

    def __init__(
        self,
        pretrained: str | Path | None = None,
        config: dict[str, Any] | None = None,
        layer: int | None = None,
        num_tokens: int | None = 64,
        reduction: str = "interpolate",
        normalize: bool = True,
        center: str | None = None,
        frozen: bool = True,
        drop_prefix_tokens: bool = True,
        dtype: str | torch.dtype = "float32",
        image_transform: dict[str, Any] | None = None,
        attn_implementation: str | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        import transformers

        if (pretrained is None) == (config is None):
            raise ValueError(
                f"encoder '{self.family}' needs exactly one of pretrained= (hub id or directory) "
                "or config= (vision config fields, for random init)"
            )
        model_cls = getattr(transformers, self.model_class)
        extra: dict[str, Any] = {"dtype": resolve_dtype(dtype)}
        if attn_implementation is not None:
            extra["attn_implementation"] = attn_implementation
        if pretrained is not None:
            # A full SigLIP/CLIP checkpoint also holds a text tower: its weights are expected to
            # be unused, so transformers' load report is silenced; missing weights still raise.
            verbosity = transformers.logging.get_verbosity()
            transformers.logging.set_verbosity_error()
            try:
                # overrides go through the config: transformers < 5.2x hands unknown
                # from_pretrained kwargs to the model's __init__ instead
                cfg = getattr(transformers, self.config_class).from_pretrained(
                    str(pretrained), **self.load_overrides
                )
                if not self._reads(cfg.model_type):
                    raise CheckpointError(
                        f"encoder '{self.family}': '{pretrained}' holds a '{cfg.model_type}' "
                        f"model, not {self.family}; use the encoder made for it"
                    )
                self.model, info = model_cls.from_pretrained(
                    str(pretrained),
                    config=cfg,
                    output_loading_info=True,
                    use_safetensors=True,
                    **extra,
                )
            except (OSError, RuntimeError, ValueError) as e:
                raise CheckpointError(
                    f"encoder '{self.family}': cannot load '{pretrained}' (weights are read from "
                    f"safetensors only; convert other formats first): {e}"
                ) from e
            finally:
                transformers.logging.set_verbosity(verbosity)
            if info.get("missing_keys"):
                raise CheckpointError(
                    f"encoder '{self.family}': '{pretrained}' lacks weights of the vision tower: "
                    f"{sorted(info['missing_keys'])[:8]}"
                )
        else:
            cfg = getattr(transformers, self.config_class)(**{**config, **self.load_overrides})
            with torch.random.fork_rng(devices=[]):
                if seed is not None:
                    torch.manual_seed(seed)
                self.model = model_cls._from_config(cfg, dtype=extra["dtype"])
        cfg = self.model.config
        if image_transform is not None:
            transform = ImageTransform.from_dict(image_transform)
        else:
            transform = self._transform_for(pretrained, cfg)
        native = self._native_size(cfg)
        if self.fixed_resolution and transform.size != native:
            raise ValueError(
                f"encoder '{self.family}': preprocessing gives {transform.size} images but the "
                f"model was trained at {native[0]}x{native[1]}"
            )
        grid = (transform.size[0] // cfg.patch_size, transform.size[1] // cfg.patch_size)
        self._setup(
            num_layers=cfg.num_hidden_layers,
            hidden_size=cfg.hidden_size,
            grid=grid,
            num_prefix_tokens=self._num_prefix_tokens(cfg),
            transform=transform,
            layer=self.default_layer if layer is None else layer,
            num_tokens=num_tokens,
            reduction=reduction,
            normalize=normalize,
            center=center,
            frozen=frozen,
            drop_prefix_tokens=drop_prefix_tokens,
            dtype=dtype,
            name=self.family,
        )

    def _reads(self, model_type: str) -> bool:
        """Whether a checkpoint of ``model_type`` is this family's: its name starts with the
        family's (``siglip_vision_model``, ``dinov2_with_registers`` ...; a family refines
        what it refuses, or the family's own check of the config follows)."""
        return model_type.startswith(self.family)

    def _native_size(self, cfg: Any) -> tuple[int, int]:
        """``(h, w)`` of the images the model was trained at."""
        return (cfg.image_size, cfg.image_size)

    def _num_prefix_tokens(self, cfg: Any) -> int:
        """Tokens before the patch grid at every layer (class, registers)."""
        return self.prefix_tokens

    def _transform_for(self, pretrained: str | Path | None, cfg: Any) -> ImageTransform:
        if pretrained is not None:
            from transformers import AutoImageProcessor

            try:
                return ImageTransform.from_hf_processor(
                    AutoImageProcessor.from_pretrained(str(pretrained))
                )
            except (OSError, ValueError) as e:
                logger.info(
                    "encoder '%s': no image processor in '%s' (%s); using defaults",
                    self.family,
                    pretrained,
                    e,
                )
        return ImageTransform(
            size=self._native_size(cfg),
            mean=self.default_mean,
            std=self.default_std,
            interpolation=self.default_interpolation,
        )

    def _layer_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=pixel_values.to(self.model.dtype), output_hidden_states=True)
        return out.hidden_states[self.layer]

    def save_pretrained(self, directory: Path) -> dict[str, Any]:
        self.model.save_pretrained(str(directory))
        return self.reload_kwargs()


class SiglipEncoder(HFVisionEncoder):
    family = "siglip"

    def _reads(self, model_type: str) -> bool:
        return super()._reads(model_type) and not model_type.startswith("siglip2")  # its own

    model_class = "SiglipVisionModel"
    config_class = "SiglipVisionConfig"
    default_interpolation = "bicubic"
    load_overrides: ClassVar[dict[str, Any]] = {"vision_use_head": False}


class ClipEncoder(HFVisionEncoder):
    family = "clip"
    model_class = "CLIPVisionModel"
    config_class = "CLIPVisionConfig"
    default_layer = -2
    prefix_tokens = 1
    default_mean = (0.48145466, 0.4578275, 0.40821073)
    default_std = (0.26862954, 0.26130258, 0.27577711)
