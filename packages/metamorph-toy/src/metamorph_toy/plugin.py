"""metamorph-toy's plugins, registered through the ``metamorph`` entry-point group."""

from __future__ import annotations

from metamorph_core.plugins.hookspecs import Register, hookimpl


@hookimpl
def register_commands(register: Register) -> None:
    register(
        "demo",
        "metamorph_toy.command:configure",
        description="the whole method on the built-in toy world, offline: train every stage, "
        "evaluate",
    )


@hookimpl
def register_eval_tasks(register: Register) -> None:
    register(
        "toy-judge",
        "metamorph_toy.eval_task:ToyJudgeTask",
        description="the toy world's judge scores each generated image against its scene",
    )
