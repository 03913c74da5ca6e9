"""The ``metamorph`` command line.

Subcommands import what they need when they run, so ``metamorph --help`` imports no torch.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from metamorph_train import __version__


def _cmd_plugins(args: argparse.Namespace) -> int:
    from metamorph_core.plugins.registry import get_registry

    registry = get_registry()
    entries = registry.entries()
    if args.json:
        rows = [
            {
                "kind": e.kind,
                "name": e.name,
                "distribution": e.distribution,
                "aliases": list(e.aliases),
                "description": e.description,
            }
            for e in entries
        ]
        print(json.dumps(rows, indent=2))
    else:
        width = max((len(e.name) for e in entries), default=4)
        print(f"{'KIND':<10} {'NAME':<{width}}  {'DISTRIBUTION':<20} DESCRIPTION")
        for e in entries:
            alias = f" (aliases: {', '.join(e.aliases)})" if e.aliases else ""
            print(f"{e.kind:<10} {e.name:<{width}}  {e.distribution:<20} {e.description}{alias}")
    for failure in registry.failures:
        print(
            f"skipped plugin '{failure.plugin}' ({failure.distribution}): {failure.error}",
            file=sys.stderr,
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="metamorph",
        description="MetaMorph: unified multimodal models by visual-predictive instruction tuning.",
    )
    parser.add_argument("--version", action="version", version=f"metamorph {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("plugins", help="list registered components and their distributions")
    p.add_argument("--json", action="store_true", help="print a JSON list of components")
    p.set_defaults(func=_cmd_plugins)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
