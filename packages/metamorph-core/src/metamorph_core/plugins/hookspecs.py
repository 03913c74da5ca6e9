"""Hook specifications of the ``metamorph`` plugin system.

A plugin is a module (or object) exposed through the ``metamorph`` entry-point group. It
implements any of the hooks below; each hook receives a ``register`` callback::

    from metamorph_core import hookimpl

    @hookimpl
    def register_encoders(register):
        register("my-encoder", "my_pkg.encoder:MyEncoder", description="...")

``register(name, factory, *, aliases=(), description="")``: ``factory`` is a callable returning
the component from keyword arguments, or a ``"module:attribute"`` string imported only when the
component is first created (so listing plugins never imports torch or heavy libraries). A name
may contain integer fields such as ``mlp{depth}x_gelu``; the matched number is passed to the
factory as that keyword (``depth=2``).

A plugin module may set ``METAMORPH_PLUGIN_API = <int>``; a value that differs from
:data:`PLUGIN_API_VERSION` marks the plugin broken (reported and skipped).
"""

from __future__ import annotations

from collections.abc import Callable

import pluggy

PROJECT_NAME = "metamorph"
ENTRY_POINT_GROUP = "metamorph"

#: Version of the hook specs below. Bumped on any incompatible change to them.
PLUGIN_API_VERSION = 1

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)

Register = Callable[..., None]

#: kind -> name of the hook that registers components of that kind.
KIND_HOOKS: dict[str, str] = {
    "encoder": "register_encoders",
    "projector": "register_projectors",
    "backbone": "register_backbones",
    "head": "register_heads",
    "decoder": "register_decoders",
    "adapter": "register_adapters",
    "loss": "register_losses",
    "template": "register_templates",
    "task": "register_tasks",
    "objective": "register_objectives",
    "eval_task": "register_eval_tasks",
    "logger": "register_loggers",
    "command": "register_commands",
}


@hookspec
def register_encoders(register: Register) -> None:
    """Register vision encoders (:class:`metamorph_core.interfaces.VisionEncoder`)."""


@hookspec
def register_projectors(register: Register) -> None:
    """Register input projectors (:class:`metamorph_core.interfaces.Projector`)."""


@hookspec
def register_backbones(register: Register) -> None:
    """Register language backbones (:class:`metamorph_core.interfaces.Backbone`)."""


@hookspec
def register_heads(register: Register) -> None:
    """Register vision heads (:class:`metamorph_core.interfaces.VisionHead`)."""


@hookspec
def register_decoders(register: Register) -> None:
    """Register visual decoders (:class:`metamorph_core.interfaces.VisualDecoder`)."""


@hookspec
def register_adapters(register: Register) -> None:
    """Register decoder conditioning adapters (visual tokens -> a diffusion model's context)."""


@hookspec
def register_losses(register: Register) -> None:
    """Register visual losses (:class:`metamorph_core.interfaces.VisualLoss`)."""


@hookspec
def register_tasks(register: Register) -> None:
    """Register task builders: raw examples -> LLaVA-style training records."""


@hookspec
def register_templates(register: Register) -> None:
    """Register conversation templates: a :class:`metamorph_core.conversation.ChatTemplate`,
    or a factory building one for the backbone's tokenizer (as ``auto`` does, see
    :mod:`metamorph_core.tokenizer_template`)."""


@hookspec
def register_objectives(register: Register) -> None:
    """Register training objectives: what ``metamorph train`` optimises, named by a recipe's
    ``objective:`` (the interface, :class:`metamorph_train.objectives.Objective`, lives in
    metamorph-train; core only names the hook)."""


@hookspec
def register_commands(register: Register) -> None:
    """Register subcommands of the ``metamorph`` command line. The factory is a ``configure``
    function: it adds the command's arguments to an ``argparse`` parser and returns the
    function that runs it (``run(args) -> exit code``); see :mod:`metamorph_core.cli`. Keep
    the module that defines it light (import torch inside ``run``) so ``metamorph --help``
    stays fast."""


@hookspec
def register_eval_tasks(register: Register) -> None:
    """Register evaluation tasks: how ``metamorph eval`` asks and scores a benchmark (the
    interface, :class:`metamorph_eval.tasks.EvalTask`, lives in metamorph-eval; core only
    names the hook)."""


@hookspec
def register_loggers(register: Register) -> None:
    """Register experiment loggers: where ``metamorph train`` sends metrics, the recipe and
    validation samples (``train.loggers: [jsonl, tensorboard]``; the interface lives in
    metamorph-train; core only names the hook)."""
