"""The ``metamorph`` command line.

Subcommands import what they need when they run, so ``metamorph --help`` imports no torch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from metamorph_core.errors import MetaMorphError  # light: no torch
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


def _cmd_cache_features(args: argparse.Namespace) -> int:
    import torch

    from metamorph_core import create
    from metamorph_train.cache import build_cache, image_paths
    from metamorph_train.data.records import check_image_record, read_records

    counts: dict[str, int] = {}  # any record with images: conversations, image-caption pairs
    records = read_records(args.data, args.on_error, counts, check_image_record)
    paths = image_paths(records)
    if not paths:
        raise SystemExit(f"metamorph cache-features: '{args.data}' names no images")
    encoder = create("encoder", args.encoder, **json.loads(args.encoder_kwargs)).to(args.device)
    out = build_cache(
        encoder,
        paths,
        args.image_root,
        args.out,
        batch_size=args.batch_size,
        dtype=getattr(torch, args.dtype),
    )
    print(
        f"cached {len(paths)} images ({counts.get('bad_records', 0)} bad records skipped) in {out}"
    )
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from metamorph_train.recipe import load_recipe, run_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # started by torchrun
        import torch
        import torch.distributed as dist

        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    summary = run_recipe(recipe)
    print(json.dumps({"summary": summary}, indent=2))
    return 0


def _cmd_merge_lora(args: argparse.Namespace) -> int:
    from metamorph_core import MetaMorphModel

    model = MetaMorphModel.from_pretrained(args.checkpoint)
    model.merge_lora()
    print(f"merged LoRA into a full checkpoint: {model.save_pretrained(args.out)}")
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
    c = sub.add_parser("cache-features", help="encode a dataset's images once into a feature cache")
    c.add_argument("--data", required=True, help=".json or .jsonl records naming images")
    c.add_argument(
        "--image-root", required=True, help="directory the records' image paths are relative to"
    )
    c.add_argument("--out", required=True, help="cache directory")
    c.add_argument("--encoder", required=True, help="encoder registry name, e.g. siglip")
    c.add_argument("--encoder-kwargs", default="{}", help='JSON, e.g. \'{"pretrained": "DIR"}\'')
    c.add_argument("--batch-size", type=int, default=64)
    c.add_argument("--device", default="cpu")
    c.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    c.add_argument("--on-error", default="raise", choices=["raise", "skip"])
    c.set_defaults(func=_cmd_cache_features)
    t = sub.add_parser(
        "train", help="train with a recipe: metamorph train RECIPE.yaml key=value ..."
    )
    t.add_argument("recipe", help="recipe YAML file")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-4")
    t.set_defaults(func=_cmd_train)
    m = sub.add_parser("merge-lora", help="write a plain full checkpoint from a LoRA checkpoint")
    m.add_argument("checkpoint", help="a MetaMorph checkpoint trained with recipe lora")
    m.add_argument("out", help="where to write the merged checkpoint")
    m.set_defaults(func=_cmd_merge_lora)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        return int(args.func(args))
    except (MetaMorphError, ValueError, KeyError, FileNotFoundError) as e:  # bad input: a message
        if os.environ.get("METAMORPH_TRACEBACK"):
            raise
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"metamorph {args.command}: error: {message}", file=sys.stderr)
        print("(set METAMORPH_TRACEBACK=1 for the full traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
