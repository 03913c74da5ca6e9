"""``metamorph merge-lora CKPT OUT``: a plain full checkpoint from a LoRA checkpoint."""

from __future__ import annotations

import argparse

from metamorph_core.cli import Run


def configure(parser: argparse.ArgumentParser) -> Run:
    parser.add_argument("checkpoint", help="a MetaMorph checkpoint trained with the lora policy")
    parser.add_argument("out", help="where to write the merged checkpoint")
    return run


def run(args: argparse.Namespace) -> int:
    from metamorph_core import MetaMorphModel

    model = MetaMorphModel.from_pretrained(args.checkpoint)
    model.merge_lora()
    print(f"merged LoRA into a full checkpoint: {model.save_pretrained(args.out)}")
    return 0
