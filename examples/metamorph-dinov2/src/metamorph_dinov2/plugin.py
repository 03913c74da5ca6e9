"""The plugin module named by the entry point. Keep it light: the factory is an import string,
so `metamorph plugins` lists `dinov2` without importing torch or transformers."""

from metamorph_core import hookimpl

METAMORPH_PLUGIN_API = 1  # the hook-spec version this plugin was written for


@hookimpl
def register_encoders(register):
    register(
        "dinov2",
        "metamorph_dinov2.encoder:Dinov2Encoder",
        description="DINOv2 (transformers Dinov2Model); last block before the final norm",
    )
