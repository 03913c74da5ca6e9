"""Evaluation speed (issue #21): ``metamorph_eval.harness.evaluate_understanding`` answering
the questions of a local task in batches of 8 against one question at a time, on the same
model and data (the mid-size random model of ``bench_generation.py``: Llama-style hidden 512,
8 layers; 64 visual tokens of width 1152 a picture), 32 questions with a 32x32 picture each,
up to 8 answer tokens. Each run writes a fresh run directory (image reading, prompting,
generation, scoring, ``samples.jsonl``). Before timing, the two batch sizes' answers are
checked identical.

Generation evaluation (``metamorph_eval.generation.runner.evaluate_generation``): images per
second for 16 prompts, the LLM's 64 visual tokens generated in batches of 8 against one prompt
at a time, each image decoded alone with its own seed by a small pixel-space ``sd-unet``
(32x32, channels 32/64, 10 DDIM steps): the decoder's share is the same in both.

    .venv/bin/python benchmarks/bench_eval.py [--repeats 3] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import transformers
import workloads as W
from bench_generation import build_model
from harness import Case, Suite, add_common_arguments, apply_threads, command_line, results_dir
from PIL import Image

from metamorph_eval.harness import evaluate_understanding
from metamorph_eval.records import read_records
from metamorph_eval.tasks import VQATask

QUESTIONS = 32
ANSWER_TOKENS = 8


def write_task(root: Path, n: int) -> Path:
    rng = np.random.default_rng(0)
    (root / "images").mkdir()
    rows = []
    for k in range(n):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
            root / "images" / f"{k}.png"
        )
        rows.append(
            {"id": f"q{k}", "question": f"what is in picture {k}?", "image": f"{k}.png",
             "answers": ["a cat"] * 10}
        )  # fmt: skip
    (root / "task.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "task.jsonl"


def measure_generation(suite: Suite, model, root: Path, args, n: int) -> None:
    from metamorph_core import create
    from metamorph_decoders.testing import tiny_unet_config
    from metamorph_eval.generation.prompts import GenPrompt
    from metamorph_eval.generation.runner import evaluate_generation

    decoder = create(
        "decoder", "sd-unet", token_dim=model.encoder.hidden_size,
        num_tokens=model.num_image_tokens, context_length=64, seed=0,
        unet_config={**tiny_unet_config(), "sample_size": 32, "block_out_channels": [32, 64]},
        adapter={"name": "mlp", "kwargs": {"hidden_dims": [256]}},
        sampling={"scheduler": "ddim", "steps": 10, "guidance_scale": 1.0},
    )  # fmt: skip
    model.attach_decoder(decoder.eval())
    prompts = [GenPrompt(k, f"p{k}", f"generate picture {k}", {}) for k in range(n)]
    runs = iter(range(1 << 30))

    def run(batch: int) -> None:
        evaluate_generation(
            model, prompts, root / f"gen-{next(runs)}", batch_size=batch, progress=False, log=None
        )

    cfg = {"prompts": n, "visual_tokens": 64, "decoder_steps": 10}
    suite.measure(
        Case("generation b1: one prompt at a time", lambda: run(1), {**cfg, "batch": 1}, {"images": n}),
        Case("generation b8: batched LLM", lambda: run(8), {**cfg, "batch": 8}, {"images": n}),
        warmup=0 if args.smoke else 1,
        repeats=args.repeats,
    )  # fmt: skip
    model.decoder = None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, repeats=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    apply_threads(args)
    n = 8 if args.smoke else QUESTIONS
    if args.smoke:
        args.repeats = 1
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    suite = Suite("eval", command_line("bench_eval.py"), wait=not args.no_wait)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = build_model(
            root, args.device, {"model_type": "llama", **W.TINY_BACKBONE} if args.smoke else None
        )
        records = read_records(write_task(root, n))
        runs = iter(range(1 << 30))

        def run(batch: int) -> list[str]:
            out = root / f"run-{next(runs)}"
            evaluate_understanding(
                model, VQATask(), records, out, image_root=root / "images",
                batch_size=batch, max_new_tokens=ANSWER_TOKENS, progress=False, log=None,
            )  # fmt: skip
            rows = (out / "samples.jsonl").read_text().splitlines()
            return [json.loads(r)["output"] for r in rows]

        if run(8) != run(1):
            raise SystemExit("batched and one-at-a-time answers differ")
        cfg = {"questions": n, "answer_tokens": ANSWER_TOKENS, "visual_tokens": 64}
        one, eight = suite.measure(
            Case("understanding b1: one question at a time", lambda: run(1), {**cfg, "batch": 1}, {"samples": n}),
            Case("understanding b8: batched", lambda: run(8), {**cfg, "batch": 8}, {"samples": n}),
            warmup=0 if args.smoke else 1,
            repeats=args.repeats,
        )  # fmt: skip
        met = "met" if eight.speedup and eight.speedup >= 4 else "not met"
        suite.note(
            f"target: batch 8 at least 4x one at a time; measured {eight.speedup:.2f}x ({met})"
        )
        measure_generation(suite, model, root, args, 4 if args.smoke else 16)
    json_path, md_path = suite.write(results_dir(args))
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
