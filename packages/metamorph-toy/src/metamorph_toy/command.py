"""``metamorph demo``: the whole method on the toy world (registered through the
``register_commands`` hook; torch is imported when it runs)."""

from __future__ import annotations

import argparse
import json

from metamorph_core.cli import Run


def configure(parser: argparse.ArgumentParser) -> Run:
    parser.add_argument("--preset", default="quick", choices=["micro", "quick", "full"])
    parser.add_argument(
        "--out", default="runs/demo", help="directory for the run (must be new, or see --overwrite)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier demo run in --out (refused if --out holds anything else)",
    )
    parser.add_argument(
        "--ablation",
        action="store_true",
        help="the paper's findings over --seeds: with/without understanding data and text "
        "facts (a run per seed and condition in --out; run again to resume)",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--reuse",
        default=None,
        metavar="RUN",
        help="with --ablation: each seed's finished demo run of the same preset, {seed} in the "
        "path for the seed (e.g. runs/demo-s{seed}); its judge, encoder and decoder (and "
        "language model where the text is the same) are copied, the data checked file by file",
    )
    parser.add_argument(
        "--lanes",
        type=int,
        choices=[1, 2],
        default=2,
        help="2: the encoder, cache and decoder train in a second process beside the judge, "
        "LM and VPiT, each on half the CPU threads (faster on small models); 1: one stage "
        "after another",
    )
    return run


def run(args: argparse.Namespace) -> int:
    from metamorph_toy.ablation import run_ablation
    from metamorph_toy.demo import Options, remove_demo_run, run_demo

    if args.ablation:
        if args.overwrite:
            raise ValueError(
                "--overwrite replaces a single demo run; for --ablation pick a new --out"
            )
        summary = run_ablation(
            args.preset, args.out, tuple(args.seeds), lanes=args.lanes, reuse=args.reuse
        )
        print(json.dumps(summary["conditions"], indent=2))
        return 0
    if args.reuse is not None:
        raise ValueError("--reuse goes with --ablation (a single demo run trains every stage)")
    if args.overwrite:
        remove_demo_run(args.out)
    metrics = run_demo(args.preset, args.out, Options(seed=args.seed), lanes=args.lanes)
    for key, m in metrics.items():
        if isinstance(m, dict) and "ci95" in m:
            lo, hi = m["ci95"]
            print(
                f"{key:<36} {m['value']:.3f}  (95% CI {lo:.3f}-{hi:.3f}, chance {m['chance']:.3f})"
            )
    print(f"report: {args.out}/report.md")
    return 0
