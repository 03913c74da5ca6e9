"""``metamorph plugins``: every registered component and command, with its distribution."""

from __future__ import annotations

import argparse
import json
import sys

from metamorph_core.cli import Run


def configure(parser: argparse.ArgumentParser) -> Run:
    parser.add_argument("--json", action="store_true", help="print a JSON list of components")
    return run


def run(args: argparse.Namespace) -> int:
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
