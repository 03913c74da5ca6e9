"""metamorph-encoders' components, registered through the ``metamorph`` entry-point group."""

from __future__ import annotations

from metamorph_core.plugins.hookspecs import Register, hookimpl


@hookimpl
def register_encoders(register: Register) -> None:
    register(
        "siglip",
        "metamorph_encoders.hf:SiglipEncoder",
        description="transformers SigLIP vision tower; hidden_states[-1], 64 tokens (paper)",
    )
    register(
        "siglip2",
        "metamorph_encoders.siglip2:Siglip2Encoder",
        description="transformers SigLIP 2 vision tower; NaFlex (aspect kept), or naflex=False: square",
    )
    register(
        "clip",
        "metamorph_encoders.hf:ClipEncoder",
        description="transformers CLIP vision tower; hidden_states[-2], class token dropped",
    )
    register(
        "timm",
        "metamorph_encoders.timm_encoder:TimmEncoder",
        description="any timm ViT (incl. *_siglip_*) or CNN (its feature maps); safetensors weights",
    )
    register(
        "open_clip",
        "metamorph_encoders.open_clip_encoder:OpenClipEncoder",
        description="any open_clip image tower (ViT, ResNet, timm-backed); needs the open_clip extra",
    )
