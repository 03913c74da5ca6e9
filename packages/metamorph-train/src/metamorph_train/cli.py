"""The ``metamorph`` command line.

Subcommands import what they need when they run, so ``metamorph --help`` imports no torch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

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
        raise SystemExit(
            f"metamorph cache-features: '{args.data}' has no text-to-image records (an "
            "'<image>' in the last gpt turn) to predict tokens for"
        )
    bad = counts.get("bad_records", 0)
    print(f"cached the predicted tokens of {n} images ({bad} bad records skipped) in {args.out}")
    return 0


def _cmd_cache_features(args: argparse.Namespace) -> int:
    import torch

    from metamorph_core import create
    from metamorph_train.cache import build_cache, image_paths
    from metamorph_train.data.records import check_image_record, read_records

    counts: dict[str, int] = {}  # any record with images: conversations, image-caption pairs
    records = read_records(args.data, args.on_error, counts, check_image_record)
    if (args.encoder is None) == (args.predicted_by is None):
        raise SystemExit("metamorph cache-features: give exactly one of --encoder, --predicted-by")
    if args.predicted_by is not None:
        return _cache_predicted(args, records, counts)
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
    import torch.distributed as dist

    if dist.is_initialized():  # a clean shutdown: no rank leaves while peers still talk
        dist.barrier()
        dist.destroy_process_group()
    print(json.dumps({"summary": summary}, indent=2))
    return 0


def _cmd_merge_lora(args: argparse.Namespace) -> int:
    from metamorph_core import MetaMorphModel

    model = MetaMorphModel.from_pretrained(args.checkpoint)
    model.merge_lora()
    print(f"merged LoRA into a full checkpoint: {model.save_pretrained(args.out)}")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from pathlib import Path

    import transformers

    from metamorph_core import MetaMorphModel
    from metamorph_core.checkpoint import save_tensors
    from metamorph_core.generation import DoneEvent, GenerationConfig, ImageEvent, TextEvent

    transformers.utils.logging.disable_progress_bar()  # the answer streams to the terminal
    for image in args.image:
        if not Path(image).is_file():
            raise FileNotFoundError(f"--image '{image}': no such file")
    model = MetaMorphModel.from_pretrained(args.model, dtype=args.dtype).to(args.device).eval()
    decode = model.decoder is not None and not args.no_decode
    config = GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        do_sample=args.do_sample,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop=tuple(args.stop),
        guidance_scale=args.guidance_scale,
        decode_images=decode,
        decode_kwargs=json.loads(args.decoder_kwargs),
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    events = model.stream(
        args.prompt,
        args.image,
        response_prefix=args.response_prefix,
        force_image=args.force_image,
        config=config,
    )
    written: list[Path] = []
    for event in events:
        if isinstance(event, TextEvent):
            print(event.text, end="", flush=True)
        elif isinstance(event, ImageEvent) and event.image is not None:
            written.append(out / f"image-{event.index}.png")
            event.image.save(written[-1])
        elif isinstance(event, DoneEvent):
            result = event.result
    print()
    (out / "text.txt").write_text(result.text + "\n")
    record = {
        "prompt": args.prompt,
        "text": result.text,
        "token_ids": result.token_ids,
        "finish_reason": result.finish_reason,
        "images": [p.name for p in written],
    }
    written.append(out / "text.txt")
    if result.images:
        tokens = {f"image_{i}": t.contiguous().cpu() for i, t in enumerate(result.images)}
        save_tensors(tokens, out / "visual_tokens.safetensors", {"format": "pt"})
        written.append(out / "visual_tokens.safetensors")
        if not decode:
            why = "--no-decode" if args.no_decode else "the checkpoint has no visual decoder"
            print(
                f"{len(result.images)} image(s) kept as visual tokens only ({why}); attach a "
                "decoder with model.attach_decoder(...) and save the model to get PNGs",
                file=sys.stderr,
            )
    (out / "result.json").write_text(json.dumps(record, indent=2) + "\n")
    written.append(out / "result.json")
    print(f"wrote {', '.join(str(p) for p in written)}", file=sys.stderr)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from metamorph_train.toy.ablation import run_ablation
    from metamorph_train.toy.demo import Options, run_demo

    if args.ablation:
        if args.overwrite:
            raise ValueError(
                "--overwrite replaces a single demo run; for --ablation pick a new --out"
            )
        summary = run_ablation(args.preset, args.out, tuple(args.seeds))
        print(json.dumps(summary["conditions"], indent=2))
        return 0
    if args.overwrite:
        from metamorph_train.toy.demo import remove_demo_run

        remove_demo_run(args.out)
    metrics = run_demo(args.preset, args.out, Options(seed=args.seed))
    for key, m in metrics.items():
        if isinstance(m, dict) and "ci95" in m:
            lo, hi = m["ci95"]
            print(
                f"{key:<36} {m['value']:.3f}  (95% CI {lo:.3f}-{hi:.3f}, chance {m['chance']:.3f})"
            )
    print(f"report: {args.out}/report.md")
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
    g = sub.add_parser(
        "generate",
        help="generate text and images from a prompt: metamorph generate --model DIR PROMPT",
    )
    g.add_argument("prompt", help="the user's message; '<image>' marks where an --image stands")
    g.add_argument("--model", required=True, help="a MetaMorph checkpoint directory")
    g.add_argument("--out", required=True, help="directory for text.txt, PNGs and result.json")
    g.add_argument("--image", action="append", default=[], help="an input image file (repeatable)")
    g.add_argument(
        "--force-image",
        action="store_true",
        help="text-to-image: the answer is one image (prefilled with <image_start>)",
    )
    g.add_argument("--response-prefix", default="", help="text the answer starts with")
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0, help="0: no top-k cut")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None, help="seed for sampling")
    g.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    g.add_argument(
        "--guidance-scale",
        type=float,
        default=1.0,
        help="classifier-free guidance on visual tokens (1.0: off)",
    )
    g.add_argument(
        "--decoder-kwargs",
        default="{}",
        help='JSON for the visual decoder, e.g. \'{"steps": 50, "guidance_scale": 7.5, "seed": 0}\'',
    )
    g.add_argument("--no-decode", action="store_true", help="keep visual tokens, write no PNG")
    g.add_argument("--device", default="cpu")
    g.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    g.set_defaults(func=_cmd_generate)
    d = sub.add_parser(
        "demo",
        help="the whole method on the built-in toy world, offline: train every stage, evaluate",
    )
    d.add_argument("--preset", default="quick", choices=["micro", "quick", "full"])
    d.add_argument(
        "--out", default="runs/demo", help="directory for the run (must be new, or see --overwrite)"
    )
    d.add_argument("--seed", type=int, default=0)
    d.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier demo run in --out (refused if --out holds anything else)",
    )
    d.add_argument(
        "--ablation",
        action="store_true",
        help="the paper's findings over --seeds: with/without understanding data and text "
        "facts (a run per seed and condition in --out; run again to resume)",
    )
    d.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    d.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        return int(args.func(args))
    except (MetaMorphError, ValueError, KeyError, FileNotFoundError, FileExistsError) as e:
        if os.environ.get("METAMORPH_TRACEBACK"):
            raise
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"metamorph {args.command}: error: {message}", file=sys.stderr)
        print("(set METAMORPH_TRACEBACK=1 for the full traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
