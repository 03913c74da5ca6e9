"""Helpers for tests of code that needs a visual decoder: a tiny pixel-space UNet config that
builds and runs in milliseconds on a CPU (random weights, nothing downloaded)."""

from __future__ import annotations

from typing import Any


def tiny_unet_config(**overrides: Any) -> dict[str, Any]:
    """A ``UNet2DConditionModel`` config for 16x16 RGB images, cross-attention dimension 32,
    cross-attention at the full-resolution level; ``overrides`` replace any key (e.g. the
    block types, to put cross-attention at the lower level instead)."""
    return {
        "sample_size": 16,
        "in_channels": 3,
        "out_channels": 3,
        "layers_per_block": 1,
        "block_out_channels": (16, 32),
        "cross_attention_dim": 32,
        "attention_head_dim": 8,
        "norm_num_groups": 8,
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        **overrides,
    }


def tiny_vae_config(**overrides: Any) -> dict[str, Any]:
    """An ``AutoencoderKL`` config for 16x16 RGB images: 8x8 latents of 4 channels."""
    return {
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        "block_out_channels": (8, 16),
        "down_block_types": ("DownEncoderBlock2D",) * 2,
        "up_block_types": ("UpDecoderBlock2D",) * 2,
        "layers_per_block": 1,
        "norm_num_groups": 4,
        "sample_size": 16,
        **overrides,
    }


def tiny_decoder(model: Any, **overrides: Any) -> Any:
    """A tiny pixel-space ``sd-unet`` decoder fitting ``model``'s visual tokens (an ``mlp``
    adapter, 8 context tokens, fixed seed); ``overrides`` replace any of its settings (e.g.
    ``sampling={...}``). Attach it with ``model.attach_decoder``."""
    from metamorph_core import create

    settings = {
        "token_dim": model.encoder.hidden_size,
        "num_tokens": model.num_image_tokens,
        "unet_config": tiny_unet_config(),
        "adapter": {"name": "mlp", "kwargs": {"hidden_dims": [48]}},
        "context_length": 8,
        "seed": 0,
        **overrides,
    }
    return create("decoder", "sd-unet", **settings)
