"""Helpers for tests of metamorph and of third-party plugins: tiny real models saved with
``save_pretrained`` (no downloads), conformance checks that any component can run, and a local
Hub cache to load repo ids from offline (:mod:`metamorph_core.testing.hub`)."""

from metamorph_core.testing import samples
from metamorph_core.testing.conformance import check_encoder
from metamorph_core.testing.hub import offline_hub, populate_hub_cache
from metamorph_core.testing.tiny import (
    TINY_FAMILIES,
    TinyFamily,
    build_tiny_tokenizer,
    save_tiny_backbone,
    tiny_model_config,
)


def free_port() -> int:
    """A local TCP port nobody listens on now, for torchrun's ``--master_port`` in tests
    (fixed ports collide between consecutive runs)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


__all__ = [
    "free_port",
    "TINY_FAMILIES",
    "TinyFamily",
    "build_tiny_tokenizer",
    "check_encoder",
    "offline_hub",
    "populate_hub_cache",
    "samples",
    "save_tiny_backbone",
    "tiny_model_config",
]
