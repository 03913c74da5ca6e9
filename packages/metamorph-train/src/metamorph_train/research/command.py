"""``metamorph convert-research CKPT OUT [--visualizer DIR --sd15 DIR] [--encoder ID_OR_DIR]
[--dtype DTYPE]``: a research-code checkpoint as a MetaMorph checkpoint."""

from __future__ import annotations

import argparse
import logging

from metamorph_core.cli import Run


def configure(parser: argparse.ArgumentParser) -> Run:
    parser.add_argument(
        "checkpoint", metavar="CKPT", help="the research code's save_pretrained directory"
    )
    parser.add_argument("out", metavar="OUT", help="where to write the MetaMorph checkpoint")
    parser.add_argument(
        "--visualizer",
        metavar="DIR",
        help="the research visualizer (adapter_checkpoint.pt, unet_checkpoint.pt, "
        "model_config.json), attached as the sd-unet decoder; needs --sd15",
    )
    parser.add_argument(
        "--sd15", metavar="DIR", help="Stable Diffusion 1.5 directory (unet/ vae/ scheduler/)"
    )
    parser.add_argument(
        "--encoder",
        metavar="ID_OR_DIR",
        help="SigLIP config/preprocessing (and weights when CKPT has no tower): a local "
        "directory or a hub id in the local cache; default google/siglip-so400m-patch14-384. "
        "Nothing is downloaded",
    )
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        help="dtype of the converted weights (default: the stored LLM weights')",
    )
    return run


def run(args: argparse.Namespace) -> int:
    from metamorph_train.research.convert import convert_research_checkpoint

    logger = logging.getLogger("metamorph")
    handler = None
    if not logger.handlers and not logging.getLogger().handlers:  # show what is dropped
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("metamorph convert-research: %(message)s"))
        logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        out = convert_research_checkpoint(
            args.checkpoint,
            args.out,
            visualizer=args.visualizer,
            sd15=args.sd15,
            encoder=args.encoder,
            dtype=args.dtype,
        )
    finally:
        logger.setLevel(level)
        if handler is not None:
            logger.removeHandler(handler)
    print(f"converted '{args.checkpoint}' -> {out} (load with MetaMorphModel.from_pretrained)")
    return 0
