"""Building ``sd-unet``'s diffusers modules from a config or a Stable-Diffusion-layout
directory: the UNet (fresh, pretrained, or pretrained with its cross-attention reshaped to the
adapter's width), the VAE, the training noise schedule, the adapter's saved weights, and the
checks that the UNet's channels fit the decoder's sample space."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from metamorph_core.errors import CheckpointError
from metamorph_decoders.loading import load_unet_weights, plan_weight_load, subfolder
from metamorph_decoders.settings import DecoderSettings
from metamorph_decoders.spatial import widen_conv_in

logger = logging.getLogger("metamorph")
DEFAULT_NOISE_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "clip_sample": False,
}


def read_unet_config(root: Path) -> dict[str, Any]:
    """The ``UNet2DConditionModel`` config in ``root/unet/``."""
    from diffusers import UNet2DConditionModel

    return dict(UNet2DConditionModel.load_config(str(subfolder(root, "unet"))))


def build_unet(
    root: Path | None, config: dict[str, Any], adapter: torch.nn.Module, reshape: bool
) -> Any:
    """The UNet of ``config``: fresh (``root`` ``None``) or with ``root/unet/``'s weights. When
    ``adapter.out_dim`` is not the config's ``cross_attention_dim`` the UNet is built for the
    adapter's width and, only if ``reshape``, its cross-attention K/V weights re-initialised
    (logged); without ``reshape`` that is a ``ValueError`` naming both widths."""
    from diffusers import UNet2DConditionModel

    if adapter.out_dim != int(config["cross_attention_dim"]):
        return _reshaped_unet(root, config, adapter, reshape)
    if root is not None:
        return UNet2DConditionModel.from_pretrained(
            str(subfolder(root, "unet")), use_safetensors=True
        )
    return UNet2DConditionModel.from_config(config)


def _reshaped_unet(
    root: Path | None, cfg: dict[str, Any], adapter: torch.nn.Module, allowed: bool
) -> Any:
    from diffusers import UNet2DConditionModel

    old, new = int(cfg["cross_attention_dim"]), adapter.out_dim
    if not allowed:
        raise ValueError(
            f"the base UNet's cross-attention width is {old} but adapter "
            f"'{type(adapter).__name__}' outputs {new}; set reshape_cross_attention=True "
            "to re-initialise the cross-attention K/V weights (they are logged), or give the "
            f"adapter out_dim={old}"
        )
    unet = UNet2DConditionModel.from_config({**cfg, "cross_attention_dim": new})
    if root is None:
        return unet
    source = load_unet_weights(subfolder(root, "unet"))
    plan = plan_weight_load(
        {k: tuple(v.shape) for k, v in source.items()},
        {k: tuple(v.shape) for k, v in unet.state_dict().items()},
        str(root),
    )
    unet.load_state_dict({k: source[k] for k in plan.load}, strict=False)
    logger.warning(
        "UNet cross-attention width %d -> %d: re-initialised %d weights: %s",
        old,
        new,
        len(plan.reinit),
        ", ".join(plan.reinit),
    )
    return unet


def build_vae(root: Path | None, vae_config: dict[str, Any] | None) -> Any:
    """A fresh ``AutoencoderKL`` from ``vae_config``, else ``root/vae/``'s; neither is a
    ``ValueError``."""
    from diffusers import AutoencoderKL

    if vae_config is not None:
        return AutoencoderKL.from_config(vae_config)
    if root is not None:
        return AutoencoderKL.from_pretrained(str(subfolder(root, "vae")), use_safetensors=True)
    raise ValueError("latent mode needs vae_config= or a pretrained directory with vae/")


def read_noise_schedule(
    root: Path | None, scheduler_config: dict[str, Any] | None
) -> dict[str, Any]:
    """The training noise schedule: ``root/scheduler/scheduler_config.json``, else
    ``scheduler_config`` (default :data:`DEFAULT_NOISE_SCHEDULE`) with ``clip_sample`` off
    unless it says otherwise; diffusers' private ``_`` keys dropped."""
    if root is not None:
        with open(subfolder(root, "scheduler") / "scheduler_config.json") as f:
            sched = json.load(f)
    else:  # x0 clipping would fight latents; off unless asked for
        sched = {"clip_sample": False, **(scheduler_config or DEFAULT_NOISE_SCHEDULE)}
    return {k: v for k, v in sched.items() if not k.startswith("_")}


def fit_channels(unet: Any, vae: Any, settings: DecoderSettings, pretrained: bool) -> int:
    """The channels of the diffusion sample (RGB or the VAE's latents, times ``patch_size``
    squared), after checking ``unet`` reads that plus ``spatial_channels`` and writes that.
    A ``pretrained`` UNet that reads exactly the sample is widened for the spatial map
    (:func:`~metamorph_decoders.spatial.widen_conv_in`); any other mismatch is a
    ``ValueError`` naming the channels each part needs."""
    mode, patch, spatial = settings.mode, settings.patch_size, settings.spatial_channels
    channels = unet.config.in_channels
    base = vae.config.latent_channels if vae is not None else 3
    sample_channels = base * patch**2
    want = sample_channels + spatial
    if pretrained and spatial and channels == sample_channels:
        widen_conv_in(unet, want)
        channels = want
    base_name = "the VAE latent channels" if vae is not None else "RGB"
    patched = f" x {patch**2} (patch_size {patch})" if patch > 1 else ""
    if channels != want:
        extra = f" + {spatial} spatial_channels" if spatial else ""
        raise ValueError(
            f"{mode} mode needs a UNet with {want} input channels "
            f"({base_name}{patched}{extra}), this one has {channels}"
        )
    if int(unet.config.out_channels) != sample_channels:
        raise ValueError(
            f"{mode} mode needs a UNet with {sample_channels} output channels "
            f"({base_name}{patched}), "
            f"this one has {unet.config.out_channels}"
        )
    return sample_channels


def image_side(unet: Any, vae: Any, patch_size: int) -> int:
    """Side in pixels of the images the decoder makes: the UNet's sample size, times the VAE's
    downsampling and ``patch_size``."""
    factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
    return int(unet.config.sample_size) * factor * patch_size


def load_adapter_file(
    path: Path,
    settings: DecoderSettings,
    adapter: torch.nn.Module,
    spatial: torch.nn.Module | None,
    null_context: torch.nn.Parameter | None,
) -> None:
    """Load ``adapter.safetensors`` into ``adapter``, ``spatial`` (``spatial.weight``, and
    ``spatial.hidden.*`` with ``spatial_hidden``) and
    ``null_context`` (``null_context``, when learned). Weights present without their module,
    absent with it, or of other shapes are a ``CheckpointError``."""
    state = load_file(str(path))
    null = state.pop("null_context", None)
    spatial_state = {
        k[len("spatial.") :]: state.pop(k) for k in list(state) if k.startswith("spatial.")
    }
    if bool(spatial_state) != (spatial is not None):
        raise CheckpointError(
            f"{path}: spatial conditioning weights present={bool(spatial_state)} but "
            f"spatial_channels={settings.spatial_channels}"
        )
    if (null is not None) != (settings.null_conditioning == "learned"):
        raise CheckpointError(
            f"{path}: learned null context present={null is not None} but "
            f"null_conditioning='{settings.null_conditioning}'"
        )
    try:
        adapter.load_state_dict(state)
        if null is not None:
            null_context.data.copy_(null)
        if spatial_state:
            spatial.load_state_dict(spatial_state)
    except RuntimeError as e:
        raise CheckpointError(
            f"{path}: the saved adapter does not fit adapter {settings.adapter_spec} with "
            f"token_dim={settings.token_dim}: {str(e)[:300]}"
        ) from e


def cast(model: Any, dtype: torch.dtype) -> Any:
    """``model`` in ``dtype`` (not moved when it already is)."""
    return model if model.dtype == dtype else model.to(dtype)
