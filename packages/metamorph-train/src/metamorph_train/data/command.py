"""``metamorph data convert``: LLaVA JSON/JSONL records and their image files into webdataset
tar shards, parquet files or a Hugging Face dataset (:mod:`metamorph_train.data.convert`)."""

from __future__ import annotations

import argparse
import json

from metamorph_core.cli import Run


def configure(parser: argparse.ArgumentParser) -> Run:
    sub = parser.add_subparsers(dest="what", metavar="WHAT", required=True)
    c = sub.add_parser(
        "convert",
        help="convert LLaVA records (+ images) into webdataset, parquet or a HF dataset",
        description="Convert a .json/.jsonl file of records (conversations, image-caption "
        "pairs, text) and the image files they name into a streaming format, images embedded "
        "as bytes. A recipe reads the result with {path: OUT, format: FORMAT}.",
    )
    c.add_argument("input", help="the records: .json (a list) or .jsonl (one a line)")
    c.add_argument("--to", required=True, choices=["webdataset", "parquet", "hf"])
    c.add_argument("--out", required=True, help="a new (or empty) output directory")
    c.add_argument(
        "--image-root", default=None, help="the directory the records' image paths are under"
    )
    c.add_argument("--shard-size", type=int, default=1000, help="records per shard (default 1000)")
    c.add_argument(
        "--on-error",
        default="raise",
        choices=["raise", "skip"],
        help="skip (and count) malformed records and records whose images are missing",
    )
    return run


def run(args: argparse.Namespace) -> int:
    from metamorph_train.data.convert import convert

    summary = convert(
        args.input,
        args.to,
        args.out,
        image_root=args.image_root,
        shard_size=args.shard_size,
        on_error=args.on_error,
    )
    skipped = f", skipped {summary['skipped']}" if summary["skipped"] else ""
    print(
        f"converted {summary['records']} records ({summary['images']} images) into "
        f"{len(summary['shards'])} {args.to} shard(s) in {args.out}{skipped}; a recipe reads "
        f"it with the source {json.dumps(summary['source'])}"
    )
    return 0
