"""metamorph-decoders' components, registered through the ``metamorph`` entry-point group."""

from __future__ import annotations

from metamorph_core.plugins.hookspecs import Register, hookimpl


@hookimpl
def register_decoders(register: Register) -> None:
    register(
        "sd-unet",
        "metamorph_decoders.sd_unet:DiffusionDecoder",
        description="diffusers UNet on visual tokens (SD layout; latent or pixel space)",
    )


@hookimpl
def register_adapters(register: Register) -> None:
    register(
        "mlp",
        "metamorph_decoders.adapters:MLPAdapter",
        description="Linear-LayerNorm-ReLU blocks, last Linear-LayerNorm (paper)",
    )
    register(
        "query",
        "metamorph_decoders.adapters:QueryAdapter",
        description="learned queries cross-attending to the tokens",
    )
