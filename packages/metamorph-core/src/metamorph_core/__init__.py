"""MetaMorph core: interfaces, the plugin registry and the VPiT unified model.

Importing this package is cheap: torch-backed names (``MetaMorphModel``, ``create`` ...) are
loaded on first attribute access, so ``metamorph --help`` and plugin listing stay fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "create": "metamorph_core.plugins.registry",
    "get_registry": "metamorph_core.plugins.registry",
    "hookimpl": "metamorph_core.plugins.hookspecs",
    "PLUGIN_API_VERSION": "metamorph_core.plugins.hookspecs",
    "MetaMorphModel": "metamorph_core.model",
    "MetaMorphConfig": "metamorph_core.config",
    "ComponentSpec": "metamorph_core.config",
    "Conversation": "metamorph_core.conversation",
    "SequenceBuilder": "metamorph_core.sequence",
    "collate": "metamorph_core.sequence",
}

__all__ = [
    "PLUGIN_API_VERSION",
    "ComponentSpec",
    "Conversation",
    "MetaMorphConfig",
    "MetaMorphModel",
    "SequenceBuilder",
    "__version__",
    "collate",
    "create",
    "get_registry",
    "hookimpl",
]

if TYPE_CHECKING:  # pragma: no cover
    from metamorph_core.config import ComponentSpec, MetaMorphConfig
    from metamorph_core.conversation import Conversation
    from metamorph_core.model import MetaMorphModel
    from metamorph_core.plugins.hookspecs import PLUGIN_API_VERSION, hookimpl
    from metamorph_core.plugins.registry import create, get_registry
    from metamorph_core.sequence import SequenceBuilder, collate


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'metamorph_core' has no attribute {name!r}")
