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
    from metamorph_core.checkpoint import CONFIG_NAME, read_json
    from metamorph_core.hub import resolve_pretrained

    path = resolve_pretrained(args.checkpoint, what="checkpoint")  # a directory or Hub repo
    recorded = {}
    if (path / CONFIG_NAME).is_file():
        backbone = read_json(path / CONFIG_NAME, path).get("components", {}).get("backbone", {})
        recorded = backbone.get("load_kwargs", {})
    if recorded.get("quantize"):
        # QLoRA: the adapter goes into the full-precision base, never into 4-bit weights
        print(
            f"the checkpoint's base was loaded {recorded['quantize']}-quantised for training; "
            "merging LoRA into the base in full precision (outputs differ from the quantised "
            "model's by the quantisation error)"
        )
        model = MetaMorphModel.from_pretrained(path, backbone_kwargs={"quantize": None})
    else:
        model = MetaMorphModel.from_pretrained(path)
    model.merge_lora()
    print(f"merged LoRA into a full checkpoint: {model.save_pretrained(args.out)}")
    return 0
