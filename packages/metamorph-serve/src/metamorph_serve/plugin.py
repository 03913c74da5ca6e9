"""metamorph-serve's plugin: the ``serve`` command."""

from __future__ import annotations

from metamorph_core.plugins.hookspecs import Register, hookimpl


@hookimpl
def register_commands(register: Register) -> None:
    register(
        "serve",
        "metamorph_serve.command:configure",
        description="serve a checkpoint over an OpenAI-compatible HTTP API with a chat page",
    )
