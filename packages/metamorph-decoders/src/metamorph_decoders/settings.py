"""``sd-unet``'s settings: :class:`DecoderSettings`, what a decoder records in its
``config.json``, and :func:`resolve_settings`, which merges the constructor's arguments with a
saved decoder's ``config.json``.

Two kinds of setting are resolved differently. *Structural* settings (:data:`STRUCTURAL`:
the token shape, the adapter, the context length, the null context, the prediction type and the
spatial/patch layout) shape the weights or what they were trained to predict: an explicit
argument that contradicts the saved value is a :class:`~metamorph_core.errors.CheckpointError`.
*Training* settings (``mode``, ``cond_dropout``, ``snr_gamma``, ``token_noise``) and the
default ``sampling`` may be changed on reload: an explicit argument wins over the saved value. Either way an argument left ``None``
takes the saved value, else the default.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from metamorph_core.config import ComponentSpec
from metamorph_core.decoding import DecodeConfig
from metamorph_core.errors import CheckpointError

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
NULL_CONDITIONINGS = ("zeros", "learned")
MODES = ("latent", "pixel")

# structural settings and their defaults, in the order contradictions are checked
STRUCTURAL: dict[str, Any] = {
    "adapter": "mlp",
    "context_length": 77,
    "null_conditioning": "zeros",
    "prediction_type": "epsilon",
    "token_dim": None,
    "num_tokens": None,
    "spatial_channels": 0,
    "spatial_detail": 1,
    "spatial_hidden": 0,
    "patch_size": 1,
}
_INTEGERS = (
    "token_dim",
    "num_tokens",
    "context_length",
    "spatial_channels",
    "spatial_detail",
    "spatial_hidden",
    "patch_size",
)


@dataclass(frozen=True)
class DecoderSettings:
    """Everything an ``sd-unet`` decoder records besides its weights (and its dtype, a loading
    choice). Construction normalises and validates the values (``adapter`` may be a name, a
    ``{"name", "kwargs"}`` dict or a ``ComponentSpec``; ``prediction_type`` may be ``v``; the
    integer fields go through ``int()``, ``token_noise`` through ``float()``); a bad value is a
    ``ValueError`` naming it. Frozen: change a copy with ``dataclasses.replace``.

    ``token_dim`` / ``num_tokens``: the width and count of the visual tokens it reads (the
    encoder's); ``mode``: ``latent`` (an ``AutoencoderKL``'s scaled latent space) or ``pixel``;
    ``adapter``: the registry name and kwargs of the tokens -> context adapter;
    ``context_length``: context tokens the UNet cross-attends to (the adapter's output is
    zero-padded to it); ``prediction_type``: ``epsilon``, ``v_prediction`` or ``sample``;
    ``cond_dropout``: probability in [0, 1] of training a sample on the null context;
    ``snr_gamma``: Min-SNR-gamma loss weighting (``None``: off); ``token_noise``: the scale of
    the training-time token perturbation (0: off); ``null_conditioning``: ``zeros`` or
    ``learned``; ``spatial_channels``: input channels of the spatial conditioning map (0: off);
    ``spatial_detail``: side of each token's pattern in that map; ``spatial_hidden``: width of a
    hidden GELU layer between each token and its pattern (0: the pattern is linear in the
    token); ``patch_size``: side of the
    patches folded into the UNet's channels (1: none); ``sampling``: how :meth:`decode` samples
    when not told otherwise (a :class:`~metamorph_core.decoding.DecodeConfig`, or a dict of
    its fields; recorded without its seed)."""

    token_dim: int
    num_tokens: int
    mode: str = "pixel"
    adapter: ComponentSpec = field(default_factory=lambda: ComponentSpec("mlp"))
    context_length: int = 77
    prediction_type: str = "epsilon"
    cond_dropout: float = 0.75
    snr_gamma: float | None = None
    token_noise: float = 0.0
    null_conditioning: str = "zeros"
    spatial_channels: int = 0
    spatial_detail: int = 1
    spatial_hidden: int = 0
    patch_size: int = 1
    sampling: DecodeConfig = field(default_factory=DecodeConfig)

    def __post_init__(self) -> None:
        # frozen: normalised values are set with object.__setattr__, in the order checked
        if self.token_dim is None or self.num_tokens is None:
            raise ValueError("decoder 'sd-unet' needs token_dim= and num_tokens= (the encoder's)")
        if not 0.0 <= self.cond_dropout <= 1.0:
            raise ValueError(f"cond_dropout must be in [0, 1], got {self.cond_dropout}")
        if self.snr_gamma is not None and not self.snr_gamma > 0:
            raise ValueError(f"snr_gamma must be > 0 (5 is usual) or None, got {self.snr_gamma}")
        if not self.token_noise >= 0.0:
            raise ValueError(
                f"token_noise must be >= 0 (0: off; 0.5 to 1 is usual), got {self.token_noise}"
            )
        object.__setattr__(self, "token_noise", float(self.token_noise))
        if self.null_conditioning not in NULL_CONDITIONINGS:
            raise ValueError(
                f"null_conditioning must be 'zeros' or 'learned', got '{self.null_conditioning}'"
            )
        for name in _INTEGERS:
            object.__setattr__(self, name, int(getattr(self, name)))
        if self.spatial_channels < 0:
            raise ValueError(f"spatial_channels must be >= 0, got {self.spatial_channels}")
        if self.spatial_detail < 1:
            raise ValueError(
                f"spatial_detail must be >= 1 (1: one value per patch), got {self.spatial_detail}"
            )
        if self.spatial_detail > 1 and not self.spatial_channels:
            raise ValueError(
                f"spatial_detail={self.spatial_detail} shapes the spatial conditioning map, which "
                "is off (spatial_channels=0); set spatial_channels > 0 or drop spatial_detail"
            )
        if self.spatial_hidden < 0:
            raise ValueError(
                f"spatial_hidden must be >= 0 (0: a linear map), got {self.spatial_hidden}"
            )
        if self.spatial_hidden and not self.spatial_channels:
            raise ValueError(
                f"spatial_hidden={self.spatial_hidden} shapes the spatial conditioning map, which "
                "is off (spatial_channels=0); set spatial_channels > 0 or drop spatial_hidden"
            )
        if self.patch_size < 1:
            raise ValueError(f"patch_size must be >= 1 (1: no patching), got {self.patch_size}")
        if self.mode not in MODES:
            raise ValueError(f"decoder mode must be 'latent' or 'pixel', got '{self.mode}'")
        object.__setattr__(self, "prediction_type", normalize_prediction_type(self.prediction_type))
        object.__setattr__(self, "adapter", ComponentSpec.parse(self.adapter, "decoder adapter"))
        object.__setattr__(self, "sampling", DecodeConfig.of(self.sampling, seed=None))

    @property
    def adapter_spec(self) -> dict[str, Any]:
        """The adapter as ``config.json`` records it: ``{"name": ..., "kwargs": {...}}``."""
        return {"name": self.adapter.name, "kwargs": dict(self.adapter.kwargs)}

    def to_dict(self) -> dict[str, Any]:
        """The settings as ``config.json`` records them (plain JSON values; the adapter as
        :attr:`adapter_spec`)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["adapter"] = self.adapter_spec
        out["sampling"] = {
            k: v for k, v in dataclasses.asdict(self.sampling).items() if k != "seed"
        }
        return out


def normalize_prediction_type(value: str) -> str:
    """``value`` with ``v`` spelled ``v_prediction``; an unknown type is a ``ValueError``."""
    value = "v_prediction" if value == "v" else value
    if value not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type '{value}'; use epsilon, v or sample")
    return value


def resolve_settings(
    given: Mapping[str, Any],
    saved: Mapping[str, Any],
    *,
    root: Path | None = None,
    has_vae: bool = False,
) -> DecoderSettings:
    """The settings of a decoder built with the arguments ``given`` (any of
    :class:`DecoderSettings`' field names; ``None`` or absent: not given) from a directory
    ``root`` whose ``config.json`` holds ``saved`` (``{}`` for none).

    Each setting is the given value, else the saved one, else the default. A structural
    setting given with a value other than the saved one is a ``CheckpointError``; a bare
    adapter name equal to the saved adapter's means "as saved". ``mode`` defaults to
    ``latent`` when ``has_vae`` (a VAE config, or ``root/vae/``), else ``pixel``.
    ``prediction_type`` may be given as ``v``."""
    names = {f.name for f in fields(DecoderSettings)}
    unknown = sorted(set(given) - names)
    if unknown:
        raise TypeError(
            f"unknown decoder setting(s) {unknown}; DecoderSettings has {sorted(names)}"
        )
    given = {key: given.get(key) for key in names}
    if given["prediction_type"]:
        given["prediction_type"] = normalize_prediction_type(given["prediction_type"])
    out = _resolve_structural(given, saved, root)

    def overridable(key: str, default: Any) -> Any:
        return saved.get(key, default) if given[key] is None else given[key]

    out["cond_dropout"] = overridable("cond_dropout", 0.75)
    out["snr_gamma"] = overridable("snr_gamma", None)
    out["token_noise"] = overridable("token_noise", 0.0)
    out["mode"] = overridable("mode", "latent" if has_vae else "pixel")
    out["sampling"] = overridable("sampling", None) or DecodeConfig()
    return DecoderSettings(**out)


def _resolve_structural(
    given: Mapping[str, Any], saved: Mapping[str, Any], root: Path | None
) -> dict[str, Any]:
    """Explicit settings, else the saved decoder's, else defaults; a contradiction is an error."""
    out = {}
    for key, default in STRUCTURAL.items():
        value, stored = given[key], saved.get(key)
        if key == "adapter" and value is not None:
            value = ComponentSpec.parse(value, "decoder adapter")
            value = {"name": value.name, "kwargs": value.kwargs}
            if stored is not None and stored["name"] == value["name"] and not value["kwargs"]:
                value = stored  # a bare name means "as saved"
        if value is not None and stored is not None and value != stored:
            raise CheckpointError(
                f"decoder in '{root}' was saved with {key}={stored!r} but {key}={value!r} was "
                "given; drop the argument to use the saved value"
            )
        out[key] = value if value is not None else stored if stored is not None else default
    return out


def settings_attribute(name: str, writable: bool = False) -> property:
    """A property mirroring ``self.config.<name>`` (``self.config``: a
    :class:`DecoderSettings`). ``writable``: assigning replaces ``self.config`` with a copy
    holding the new value, validated; otherwise assigning is an ``AttributeError``."""

    def get(self: Any) -> Any:
        return getattr(self.config, name)

    def set_value(self: Any, value: Any) -> None:
        self.config = dataclasses.replace(self.config, **{name: value})

    doc = f"``config.{name}``" + ("; assigning validates it." if writable else " (read-only).")
    return property(get, set_value if writable else None, doc=doc)
