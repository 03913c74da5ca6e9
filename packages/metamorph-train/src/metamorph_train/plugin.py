"""metamorph-train's components, registered through the ``metamorph`` entry-point group."""

from __future__ import annotations

from metamorph_core.plugins.hookspecs import Register, hookimpl


@hookimpl
def register_tasks(register: Register) -> None:
    from metamorph_train.tasks import TASKS  # light: no torch

    for name, (fn, description) in TASKS.items():
        register(name, lambda fn=fn: fn, description=description)
