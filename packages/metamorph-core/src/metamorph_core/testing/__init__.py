"""Helpers for tests of metamorph and of third-party plugins: tiny real models saved with
``save_pretrained`` (no downloads) and conformance checks that any component can run."""

from metamorph_core.testing import samples
from metamorph_core.testing.conformance import check_encoder
from metamorph_core.testing.tiny import (
    TINY_FAMILIES,
    build_tiny_tokenizer,
    save_tiny_backbone,
    tiny_model_config,
)

__all__ = [
    "TINY_FAMILIES",
    "build_tiny_tokenizer",
    "check_encoder",
    "samples",
    "save_tiny_backbone",
    "tiny_model_config",
]
