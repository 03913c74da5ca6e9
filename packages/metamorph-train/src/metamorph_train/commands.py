"""metamorph-train's commands: ``metamorph train`` and ``metamorph cache-features``
(registered through the ``register_commands`` hook; torch is imported when they run)."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from metamorph_core.cli import Run


def configure_train(parser: argparse.ArgumentParser) -> Run:
    parser.add_argument("recipe", help="recipe YAML file")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-4")
    return run_train


def run_train(args: argparse.Namespace) -> int:
    from metamorph_train.recipe import load_recipe
    from metamorph_train.runner import run_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # started by torchrun
        import torch
        import torch.distributed as dist

        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    summary = run_recipe(recipe)
    import torch.distributed as dist

    if dist.is_initialized():  # a clean shutdown: no rank leaves while peers still talk
        dist.barrier()
        dist.destroy_process_group()
    print(json.dumps({"summary": summary}, indent=2))
    return 0


def configure_cache_features(parser: argparse.ArgumentParser) -> Run:
    c = parser
    c.add_argument("--data", required=True, help=".json or .jsonl records naming images")
    c.add_argument(
        "--image-root", required=True, help="directory the records' image paths are relative to"
    )
    c.add_argument("--out", required=True, help="cache directory")
    c.add_argument("--encoder", help="encoder registry name, e.g. siglip")
    c.add_argument(
        "--predicted-by",
        metavar="MODEL_DIR",
        help="instead of encoding the images, cache the visual tokens this unified model "
        "generates for each text-to-image record's prompt (decoder fine-tuning data)",
    )
    c.add_argument("--encoder-kwargs", default="{}", help='JSON, e.g. \'{"pretrained": "DIR"}\'')
    c.add_argument("--batch-size", type=int, default=64)
    c.add_argument("--device", default="cpu")
    c.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    c.add_argument("--on-error", default="raise", choices=["raise", "skip"])
    return run_cache_features


def run_cache_features(args: argparse.Namespace) -> int:
    import torch

    from metamorph_core import create
    from metamorph_train.cache import build_cache, image_paths
    from metamorph_train.data.records import check_image_record, read_records

    counts: dict[str, int] = {}  # any record with images: conversations, image-caption pairs
    records = read_records(args.data, args.on_error, counts, check_image_record)
    if (args.encoder is None) == (args.predicted_by is None):
        raise ValueError("give exactly one of --encoder, --predicted-by")
    if args.predicted_by is not None:
        return _cache_predicted(args, records, counts)
    paths = image_paths(records)
    if not paths:
        raise ValueError(f"'{args.data}' names no images")
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


def _cache_predicted(args: argparse.Namespace, records: list[Any], counts: dict[str, int]) -> int:
    import torch

    from metamorph_core import MetaMorphModel
    from metamorph_train.cache import build_predicted_cache

    model = MetaMorphModel.from_pretrained(args.predicted_by).to(args.device).eval()
    n = build_predicted_cache(
        model,
        records,
        args.out,
        predicted_by=args.predicted_by,
        batch_size=args.batch_size,
        dtype=getattr(torch, args.dtype),
    )
    if not n:
        raise ValueError(
            f"'{args.data}' has no text-to-image records (an '<image>' in the last gpt turn) to "
            "predict tokens for"
        )
    bad = counts.get("bad_records", 0)
    print(f"cached the predicted tokens of {n} images ({bad} bad records skipped) in {args.out}")
    return 0
