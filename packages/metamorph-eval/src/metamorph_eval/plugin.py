"""metamorph-eval's plugins, registered through the ``metamorph`` entry-point group: the
built-in understanding tasks (kind ``eval_task``) and the ``eval`` command."""

from __future__ import annotations

from metamorph_core.plugins.hookspecs import Register, hookimpl


@hookimpl
def register_eval_tasks(register: Register) -> None:
    from metamorph_eval.tasks import BUILTIN_TASKS  # light: no torch

    for name, (cls, description) in BUILTIN_TASKS.items():
        register(name, f"metamorph_eval.tasks:{cls.__name__}", description=description)


@hookimpl
def register_commands(register: Register) -> None:
    register(
        "eval",
        "metamorph_eval.command:configure",
        description="evaluate a model: understanding benchmarks, generation metrics",
    )
