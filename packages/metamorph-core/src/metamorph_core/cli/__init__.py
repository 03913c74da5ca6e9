"""The ``metamorph`` command line.

Commands are plugins of kind ``command``: each installed package registers its own through the
``register_commands`` hook (core: ``plugins``, ``generate``, ``merge-lora``; metamorph-train:
``train``, ``cache-features``; metamorph-toy: ``demo``). ``metamorph --help`` lists every
installed command from the registry alone and imports no torch; only the command that runs is
imported and configured. A command plugin that fails to load is reported and skipped, as a
broken component plugin is.

A command registers a ``configure`` function: it adds the command's arguments to an
``argparse`` parser and returns the function that runs it (``run(args) -> exit code``)::

    @hookimpl
    def register_commands(register):
        register("my-command", "my_pkg.cli:configure", description="one line for --help")
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from metamorph_core import __version__
from metamorph_core.errors import MetaMorphError

Run = Callable[[argparse.Namespace], int]
Configure = Callable[[argparse.ArgumentParser], Run]

# commands of first-party packages that may not be installed: a hint instead of "invalid choice"
_PROVIDED_BY = {
    "train": "metamorph-train",
    "cache-features": "metamorph-train",
    "convert-research": "metamorph-train",
    "export": "metamorph-train",
    "data": "metamorph-train",
    "demo": "metamorph-toy",
    "eval": "metamorph-eval",
    "serve": "metamorph-serve",
}


def _registry() -> Any:
    from metamorph_core.plugins.registry import get_registry

    registry = get_registry()
    with warnings.catch_warnings():  # skipped plugins are reported below, once, in plain words
        warnings.simplefilter("ignore", RuntimeWarning)
        registry.entries("command")
    for failure in registry.failures:
        print(
            f"metamorph: skipped plugin '{failure.plugin}' ({failure.distribution}): "
            f"{failure.error}",
            file=sys.stderr,
        )
    return registry


def _chosen(argv: Sequence[str]) -> str | None:
    """The command named in ``argv``: its first word that is not an option."""
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The parser of every installed command; the one ``argv`` names is configured."""
    registry = _registry()
    parser = argparse.ArgumentParser(
        prog="metamorph",
        description="MetaMorph: unified multimodal models by visual-predictive instruction tuning.",
    )
    parser.add_argument("--version", action="version", version=f"metamorph {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = _chosen(argv)
    for entry in registry.entries("command"):
        p = sub.add_parser(
            entry.name,
            help=f"{entry.description} [{entry.distribution}]",
            description=entry.description,
        )
        if entry.name == chosen:
            configure: Configure = entry.load_factory()
            p.set_defaults(run=configure(p))
    installed = {e.name for e in registry.entries("command")}
    if chosen in _PROVIDED_BY and chosen not in installed:
        parser.error(
            f"'{chosen}' comes with the {_PROVIDED_BY[chosen]} package, which is not "
            f"installed: pip install {_PROVIDED_BY[chosen]}"
        )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``metamorph ARGV``; returns the exit code (2 for a user error, with one line)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser(argv)
    except MetaMorphError as e:  # a command that cannot be loaded, or strict plugin loading
        print(f"metamorph: error: {e}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    try:
        return int(args.run(args))
    except (MetaMorphError, ValueError, KeyError, FileNotFoundError, FileExistsError) as e:
        if os.environ.get("METAMORPH_TRACEBACK"):
            raise
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"metamorph {args.command}: error: {message}", file=sys.stderr)
        print("(set METAMORPH_TRACEBACK=1 for the full traceback)", file=sys.stderr)
        return 2


__all__ = ["Configure", "Run", "build_parser", "main"]
