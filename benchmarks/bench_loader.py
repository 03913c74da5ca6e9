"""Training data loader (issue #22): images read and preprocessed in worker processes.

Throughput: images per second through :class:`metamorph_train.data.loader.Loader` (the
trainer's loader: the mixture's draw in the main process, JPEG decoding and the SigLIP
so400m-384 transform, bicubic resize to 384x384 and normalisation, in workers) for 0 (all in
the main process), 1, 2 and 4 workers: 256 understanding records, one 640x480 JPEG each, in
micro-batches of 16. Each run builds a fresh loader (worker start included).

Step time: a training loop whose step takes ``--step-ms`` of device time per micro-batch (a
sleep: while a GPU computes, the host's cores are free; default 3/4 of the time one worker,
a single-threaded process, needs to read a micro-batch), fed by the same loader. The loop
does what the trainer does with a micro-batch on the host (``objective.batch``: tokenising,
collating, stacking the pixels) and then waits for the "device". Without workers a step costs
loading plus device time; with enough workers it should cost the device time alone. Also the
loop without any loading (the items read once, ahead) as the floor.

The training process runs with one torch thread (``--threads`` to change): on a small host its
own threads would take the cores the workers read with.

    .venv/bin/python benchmarks/bench_loader.py [--repeats 3] [--smoke] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from harness import Case, Suite, add_common_arguments, apply_threads, command_line, results_dir
from PIL import Image

from metamorph_core import MetaMorphModel
from metamorph_core.testing import save_tiny_backbone, tiny_model_config
from metamorph_train.data import ConversationDataset, Mixture
from metamorph_train.data.loader import Loader
from metamorph_train.objectives import VPiTObjective

MICRO_BATCH = 16


def write_records(root: Path, n: int, size: tuple[int, int]) -> Path:
    """``n`` records with a JPEG each (a smooth picture plus noise, as photos compress)."""
    rng = np.random.default_rng(0)
    (root / "img").mkdir()
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    rows = []
    for k in range(n):
        base = np.stack([(xx * (k + 1)) % 256, (yy * 3 + k) % 256, (xx + yy) % 256], -1)
        noisy = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(root / "img" / f"{k}.jpg", quality=90)
        rows.append(
            {"id": f"r{k}", "image": f"{k}.jpg", "conversations": [
                {"from": "human", "value": "<image>\nwhat is in the picture?"},
                {"from": "gpt", "value": f"picture number {k}"}]}
        )  # fmt: skip
    (root / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "r.jsonl"


def siglip_384_objective(root: Path) -> VPiTObjective:
    """A tiny unified model whose encoder preprocesses as SigLIP so400m-384 does."""
    from transformers import SiglipImageProcessor

    from metamorph_encoders.transforms import ImageTransform

    model = MetaMorphModel.from_config(
        tiny_model_config(save_tiny_backbone(root / "bb", "llama", seed=1))
    )
    processor = SiglipImageProcessor(size={"height": 384, "width": 384})
    transform = ImageTransform.from_hf_processor(processor)
    model.encoder.preprocess = transform  # what the siglip encoder's preprocess runs
    return VPiTObjective(model)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, repeats=3)
    parser.add_argument("--step-ms", type=float, default=None, help="device time per step")
    args = parser.parse_args()
    # one torch thread in the training process (unless --threads says otherwise): on a small
    # host its own threads would take the cores the workers read with; a GPU training process
    # leaves the host's cores to the loader
    args.threads = args.threads or 1
    apply_threads(args)
    if args.smoke:
        args.repeats = 1
    n = 32 if args.smoke else 256
    suite = Suite("loader", command_line("bench_loader.py"), wait=not args.no_wait)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        path = write_records(root, n, (480, 640))
        objective = siglip_384_objective(root)
        steps = n // MICRO_BATCH

        def loader(workers: int) -> Loader:
            data = ConversationDataset(path, root / "img")
            mixture = Mixture({"a": data}, {"a": 1.0}, seed=0)
            return Loader(mixture, objective, MICRO_BATCH, num_workers=workers, prefetch=2)

        def read(workers: int) -> None:
            source = loader(workers)
            for _ in range(steps):
                source.next()
            source.close()

        cfg = {"images": n, "micro_batch": MICRO_BATCH, "image": "640x480 JPEG -> 384x384"}
        counts = {"images": n}
        worker_counts = (0, 1, 2) if args.smoke else (0, 1, 2, 4)
        results = suite.measure(
            *[
                Case(f"read {w} workers", lambda w=w: read(w), {**cfg, "workers": w}, counts)
                for w in worker_counts
            ],
            warmup=0 if args.smoke else 1,
            repeats=args.repeats,
        )
        # a worker process reads with one thread (DataLoader's setting): the step below
        # consumes a micro-batch faster than one such process reads it
        alone = results[0].median_s / steps
        one_worker = results[1].median_s / steps
        step_s = (args.step_ms / 1000) if args.step_ms else 0.75 * one_worker
        suite.note(
            f"a micro-batch of {MICRO_BATCH} is read in {alone * 1000:.0f} ms by the training "
            f"process ({args.threads or 'default'} torch threads) and in "
            f"{one_worker * 1000:.0f} ms by one worker (1 thread); the step below takes "
            f"{step_s * 1000:.0f} ms of device time"
        )
        ahead = [loader(0).next() for _ in range(1)][0]

        def train(workers: int | None) -> None:
            source = None if workers is None else loader(workers)
            for _ in range(steps):
                items = ahead if source is None else source.next()
                objective.batch(items, 0)  # the host's share of a step
                time.sleep(step_s)  # the device's share
            if source is not None:
                source.close()

        step_cfg = {**cfg, "device_ms_per_step": round(step_s * 1000, 1)}
        step_counts = {"steps": steps}
        trained = suite.measure(
            Case("steps, items read ahead (floor)", lambda: train(None), step_cfg, step_counts),
            *[
                Case(f"steps, {w} workers", lambda w=w: train(w), {**step_cfg, "workers": w},
                     step_counts)
                for w in (0, 2)
            ],
            warmup=0 if args.smoke else 1,
            repeats=args.repeats,
        )  # fmt: skip
        floor, alone, two = (r.median_s / steps for r in trained)
        met = "met" if two <= floor * 1.15 else "not met"
        suite.note(
            f"step time: floor {floor * 1000:.0f} ms, 0 workers {alone * 1000:.0f} ms, "
            f"2 workers {two * 1000:.0f} ms (target: 2 workers within 15% of the floor, {met})"
        )
    json_path, md_path = suite.write(results_dir(args))
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
