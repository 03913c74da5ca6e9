"""``metamorph eval generation``: generate images for a prompt file with a checkpoint that has a
visual decoder, write them (and the GenEval / DPG-Bench layout), and score them (Fréchet
distances against a reference folder, CLIP score). Rerun the same command to resume."""

from __future__ import annotations

import argparse
import json
from typing import Any

from metamorph_core.cli import Run

_METRIC_HELP = (
    "comma-separated, from fid (InceptionV3, needs --inception-weights), fd-encoder (a "
    "registered encoder's space, needs --encoder), clip (needs --clip); default: each metric "
    "whose inputs are given"
)


def configure_generation(parser: argparse.ArgumentParser) -> Run:
    """Add the arguments of ``metamorph eval generation`` to ``parser``; returns its run."""
    g = parser
    g.description = (
        "Generate --images-per-prompt images for the first --num-images prompts of --prompts "
        "(LLM batches of --batch-size, each image decoded with its own seed), save them in "
        "OUT/images as they finish, optionally lay them out for GenEval or DPG-Bench, and score "
        "them; OUT/results.json holds the metrics and the recorded settings. Rerun the same "
        "command to resume; other settings into the same --out are refused."
    )
    g.add_argument("--model", required=True, help="a MetaMorph checkpoint with a visual decoder")
    g.add_argument(
        "--prompts",
        required=True,
        metavar="FILE",
        help="JSONL with a 'prompt' (and optional 'id') per line, e.g. GenEval's "
        "evaluation_metadata.jsonl; a folder of <id>.txt files (DPG-Bench's prompts/); or a "
        "text file with one prompt a line",
    )
    g.add_argument("--out", required=True, help="the run directory")
    g.add_argument(
        "--num-images",
        type=int,
        default=None,
        metavar="N",
        help="use the first N prompts (N x --images-per-prompt images); default: all",
    )
    g.add_argument(
        "--images-per-prompt",
        type=int,
        default=None,
        help="default: 4 with --layout (GenEval's and DPG-Bench's number), else 1",
    )
    g.add_argument("--batch-size", type=int, default=8, help="prompts per LLM batch")
    g.add_argument("--seed", type=int, default=0, help="image k of prompt p: seed from (seed,p,k)")
    g.add_argument(
        "--visual-guidance-scale",
        type=float,
        default=1.0,
        help="the LLM's classifier-free guidance on visual tokens (1.0: off)",
    )
    d = g.add_argument_group("visual decoder (default: the decoder's own sampling)")
    d.add_argument("--decoder-scheduler", help="the decoder's sampler (ddim, euler, ...)")
    d.add_argument("--decoder-steps", type=int, help="denoising steps")
    d.add_argument("--decoder-guidance-scale", type=float, help="guidance on pixels, 1.0 off")
    m = g.add_argument_group("metrics")
    m.add_argument("--metrics", default=None, help=_METRIC_HELP)
    m.add_argument("--reference", default=None, metavar="DIR", help="real images (any depth)")
    m.add_argument(
        "--inception-weights",
        default=None,
        metavar="PATH",
        help="FID's InceptionV3 weights (pt_inception-2015-12-05, .pth or .safetensors); "
        "nothing is downloaded",
    )
    m.add_argument("--encoder", default=None, help="a registered encoder for fd-encoder")
    m.add_argument(
        "--encoder-kwargs",
        default="{}",
        metavar="JSON",
        help='its keyword arguments, e.g. \'{"pretrained": "/models/siglip"}\'',
    )
    m.add_argument("--clip", default=None, metavar="DIR", help="a local CLIP or SigLIP checkpoint")
    m.add_argument("--metric-batch-size", type=int, default=32, help="images embedded at once")
    m.add_argument(
        "--on-error",
        default="raise",
        choices=["raise", "skip"],
        help="an unreadable reference image: stop naming it, or leave it out and count it",
    )
    lay = g.add_argument_group("benchmark layouts")
    lay.add_argument(
        "--layout",
        default=None,
        choices=["geneval", "dpg"],
        help="also write OUT/geneval/<index>/{metadata.jsonl,samples/<k>.png} or "
        "OUT/dpg/<id>.png (2x2 grids) for the official scorers",
    )
    lay.add_argument(
        "--grid-resolution",
        type=int,
        default=None,
        help="DPG: the side of each grid tile, compute_dpg_bench.py's --resolution "
        "(default: the generated images' size)",
    )
    g.add_argument("--device", default="cpu")
    g.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    return run_generation


def _metrics(args: argparse.Namespace) -> list[str]:
    if args.metrics is not None:
        return [n.strip() for n in args.metrics.split(",") if n.strip()]
    given = {"fid": args.inception_weights, "fd-encoder": args.encoder, "clip": args.clip}
    names = [n for n, v in given.items() if v]
    if args.reference and not {"fid", "fd-encoder"} & set(names):
        raise ValueError(
            "--reference is given but no Fréchet metric: pass --inception-weights PATH (fid) "
            "or --encoder NAME (fd-encoder), or --metrics"
        )
    return names


def _encoder_kwargs(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--encoder-kwargs is not JSON ({e}): {text!r}") from e
    if not isinstance(value, dict):
        raise ValueError(f"--encoder-kwargs must be a JSON object, got {text!r}")
    return value


def run_generation(args: argparse.Namespace) -> int:
    from pathlib import Path

    import transformers

    from metamorph_core import MetaMorphModel
    from metamorph_eval.generation.metrics import MetricOptions, check_metrics
    from metamorph_eval.generation.prompts import read_prompts
    from metamorph_eval.generation.runner import evaluate_generation
    from metamorph_eval.harness import model_identity

    transformers.utils.logging.disable_progress_bar()
    prompts = read_prompts(args.prompts, args.num_images)
    names = _metrics(args)
    options = MetricOptions(
        inception_weights=args.inception_weights,
        encoder=args.encoder,
        encoder_kwargs=_encoder_kwargs(args.encoder_kwargs),
        clip=args.clip,
        batch_size=args.metric_batch_size,
    )
    check_metrics(names, args.reference, options)  # before the model is loaded
    given = {
        "scheduler": args.decoder_scheduler,
        "steps": args.decoder_steps,
        "guidance_scale": args.decoder_guidance_scale,
    }
    decoding = {k: v for k, v in given.items() if v is not None}
    per_prompt = args.images_per_prompt or (4 if args.layout else 1)
    model = MetaMorphModel.from_pretrained(args.model, dtype=args.dtype).to(args.device).eval()
    evaluate_generation(
        model,
        prompts,
        args.out,
        batch_size=args.batch_size,
        images_per_prompt=per_prompt,
        seed=args.seed,
        decoding=decoding,
        visual_guidance_scale=args.visual_guidance_scale,
        reference=args.reference,
        metrics=names,
        metric_options=options,
        layout=args.layout,
        grid_resolution=args.grid_resolution,
        on_error=args.on_error,
        model_id={**model_identity(args.model), "dtype": args.dtype},
        prompts_id={"path": str(Path(args.prompts))},
    )
    return 0
