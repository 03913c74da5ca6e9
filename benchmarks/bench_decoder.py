"""Decoder sampling speed (issue #8, part 3): images per second of the ``sd-unet`` decoder per
scheduler and step count, with classifier-free guidance (both branches in one batched UNet
call, as ``DiffusionDecoder.decode`` runs them).

The decoder is the toy demo's (``metamorph demo --preset quick``): a pixel-space UNet at
32x32 (channels 32/64/64, one layer per block, cross-attention at the lowest resolution
only), conditioned through the ``mlp`` adapter on 16 visual tokens of width 64, ``sample``
prediction, random weights. A batch of 8 images, guidance 2.0 (the demo's; every step is one
UNet call on 16 rows). Schedulers (any of ``metamorph_decoders.schedulers.SCHEDULERS`` that
can step ``sample`` prediction; by default DDIM, DPM-Solver++ multistep and Euler) are
compared at equal step counts against DDIM, runs interleaved: the UNet dominates, so the
ratios show each scheduler's own overhead; across step counts the time is ~linear. Before
timing, every scheduler samples once and its images are checked for shape and finiteness.

    .venv/bin/python benchmarks/bench_decoder.py [--repeats 3] [--smoke] [--no-wait]
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch
from harness import Case, Suite, add_common_arguments, apply_threads, command_line, results_dir

from metamorph_core import create

SCHEDULERS = ("ddim", "dpm-solver++", "euler")
STEPS = (10, 25, 50)
BATCH, GUIDANCE = 8, 2.0
TOKENS, TOKEN_DIM = 16, 64


def unet_config(channels: tuple[int, ...]) -> dict[str, Any]:
    """The toy demo's pixel-space UNet (``metamorph_toy.stages.train_decoder``)."""
    depth = len(channels)
    return {
        "sample_size": 32,
        "in_channels": 3,
        "out_channels": 3,
        "layers_per_block": 1,
        "block_out_channels": list(channels),
        "cross_attention_dim": 64,
        "attention_head_dim": 8,
        "norm_num_groups": 8,
        "down_block_types": ["DownBlock2D"] * (depth - 1) + ["CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D"] + ["UpBlock2D"] * (depth - 1),
    }


def build_decoder(smoke: bool, device: str) -> Any:
    return create(
        "decoder",
        "sd-unet",
        token_dim=TOKEN_DIM,
        num_tokens=TOKENS,
        unet_config=unet_config((8, 16) if smoke else (32, 64, 64)),
        adapter={"name": "mlp", "kwargs": {"hidden_dims": [128]}},
        context_length=TOKENS,
        prediction_type="sample",
        seed=0,
    ).to(device)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--schedulers", default=",".join(SCHEDULERS))
    parser.add_argument("--steps", default=",".join(map(str, STEPS)))
    args = parser.parse_args()
    apply_threads(args)
    schedulers = args.schedulers.split(",")
    steps_list = [int(s) for s in args.steps.split(",")]
    if args.smoke:
        args.repeats, steps_list = 1, [2, 4]
    name = "decoder" + ("" if args.device == "cpu" else f"-{args.device}")
    suite = Suite(name, command_line("bench_decoder.py"), wait=not args.no_wait)
    decoder = build_decoder(args.smoke, args.device).eval()
    g = torch.Generator().manual_seed(0)
    tokens = torch.nn.functional.normalize(
        torch.randn(BATCH, TOKENS, TOKEN_DIM, generator=g), dim=-1
    )
    tokens = tokens.to(args.device)

    def sample(scheduler: str, steps: int) -> torch.Tensor:
        return decoder.decode(
            tokens, scheduler=scheduler, steps=steps, guidance_scale=GUIDANCE, seed=0
        )

    for scheduler in schedulers:  # every scheduler runs and gives images of the right shape
        images = sample(scheduler, 2)
        if tuple(images.shape) != (BATCH, 3, *decoder.image_size) or not images.isfinite().all():
            raise SystemExit(f"scheduler {scheduler}: bad images {tuple(images.shape)}")
    params = sum(p.numel() for p in decoder.unet.parameters())
    for steps in steps_list:
        cfg = {"batch": BATCH, "steps": steps, "guidance": GUIDANCE, "unet_params": params}
        cases = [
            Case(
                f"{scheduler}, {steps} steps",
                lambda s=scheduler, n=steps: sample(s, n),
                {**cfg, "scheduler": scheduler},
                {"images": BATCH, "sampler steps": steps},
            )
            for scheduler in schedulers
        ]
        # the process is warm after the first group (the checks above ran every scheduler)
        suite.measure(*cases, repeats=args.repeats, warmup=1 if steps == steps_list[0] else 0)
    json_path, md_path = suite.write(results_dir(args))
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
