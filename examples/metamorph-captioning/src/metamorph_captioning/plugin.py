"""The plugin module named by the entry point. Keep it light: the factory is an import string,
so `metamorph plugins` lists `caption` without importing torch."""

from metamorph_core import hookimpl

METAMORPH_PLUGIN_API = 1  # the hook-spec version this plugin was written for


@hookimpl
def register_objectives(register):
    register(
        "caption",
        "metamorph_captioning.objective:CaptionObjective",
        description="image-caption pairs as 'describe the image' conversations; text loss only",
    )
