"""Training-step speed and memory (issue #8, part 1), on random weights of the issue's
mid-size configuration: a Llama-style backbone (hidden 512, 8 layers, 8 heads, MLP 1536,
vocabulary 32000) and a small SigLIP-style encoder (width 384, 6 blocks, 128 px, 16 px
patches: 64 tokens, frozen), ``mlp2x_gelu`` projector and head, batch 4 x 320 tokens with one
image each. The weights are saved with ``save_pretrained`` and loaded through metamorph's
``hf-causal-lm`` and ``siglip`` loaders; a step is the trainer's (``workloads.Step``: loss
sums over token counts, backward, clipping, AdamW over the ``full`` recipe's parameters).

What is compared, each pair in one process, runs interleaved:

- **metamorph vs transformers' LLaVA** (``LlavaForConditionalGeneration``, same weights
  copied in, understanding-only: the image in the prompt, a text answer): tokens/s and model
  FLOP utilisation, fp32 and bf16 autocast. Their losses are checked equal before timing.
  metamorph's step must not be slower.
- **the VPiT step with a generation target** (the image is the answer: visual loss through
  the vision head), with the encoder run live vs a **feature cache** (the same tokens
  precomputed, as ``metamorph cache-features`` stores them); losses checked equal.
- **packing vs padding** on a length-skewed batch (8 samples of 120-320 tokens, packed into
  rows of 320 vs padded to 320), fp32: real tokens/s; loss sums checked equal.
- **full vs LoRA peak memory** (r 16, all linear layers, the ``lora`` recipe's parameters), and
  on a text-heavy batch the whole vocabulary projection vs ``objective.loss_chunk`` (the
  projection and cross-entropy in chunks, logits recomputed in backward), each configuration in its own subprocess (a process's peak only grows): peak RSS while
  training (peak CUDA allocation on a GPU) over two steps of the generation batch, and the
  exact size of weights, gradients and optimizer state.

MFU is against this machine's matmul peak measured in the same run (the best of five runs of
square matmuls, fp32 and bf16); the FLOP count is in ``workloads.py`` and BENCHMARKS.md.

    .venv/bin/python benchmarks/bench_training.py [--repeats 3] [--smoke] [--no-wait]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
import transformers
import workloads as W
from harness import (
    Case,
    Result,
    Suite,
    add_common_arguments,
    apply_threads,
    command_line,
    current_rss_mib,
    peak_memory,
    reset_peak_memory,
    results_dir,
    run_json_subprocess,
)

from metamorph_core.sequence import IGNORE_INDEX
from metamorph_train.objectives import VPiTObjective

SEQUENCE, BATCH = 320, 4
LOSS_CHUNK = 256  # objective.loss_chunk of the chunked memory run
SKEWED = [320, 120, 120, 140, 130, 160, 150, 170]  # real tokens of the packing batch
DTYPES = {"fp32": False, "bf16": True}


def shapes(smoke: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    return (W.TINY_BACKBONE, W.TINY_SIGLIP) if smoke else (W.MID_BACKBONE, W.SMALL_SIGLIP)


def build(tmp: Path, smoke: bool, device: str) -> Any:
    backbone, encoder = shapes(smoke)
    return W.build_saved_model(tmp, backbone, encoder).to(device)


def add_mfu(result: Result, flops: float, peak_gflops: float) -> None:
    """Model FLOPs per second of ``result`` and its share of the measured peak."""
    achieved = flops / result.median_s / 1e9
    result.figures["GFLOP/s"] = achieved
    result.figures["% MFU"] = 100 * achieved / peak_gflops


def measure_peaks(suite: Suite, args: argparse.Namespace, n: int, repeat: int) -> dict[str, float]:
    """The machine's matmul peak in GFLOP/s per dtype (``repeat`` square ``n`` matmuls a
    run)."""
    peaks = {}
    for label, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        fn, gflop = W.matmul_peak_case(n, dtype, args.device, repeat)
        (r,) = suite.measure(
            Case(
                f"matmul peak {label} ({repeat} x {n}^3)",
                fn,
                {"n": n, "dtype": label, "matmuls_per_run": repeat},
                {"GFLOP": gflop},
            ),
            warmup=2,
            repeats=max(args.repeats, 5),
        )
        # the peak is the best run (the median is kept in the table as usual)
        peaks[label] = gflop / min(r.runs)
        r.figures["GFLOP/s peak (best run)"] = peaks[label]
    return peaks


def llava_comparison(
    suite: Suite, model: Any, args: argparse.Namespace, peaks: dict[str, float]
) -> None:
    """metamorph's understanding step vs LLaVA's on the same weights and batch."""
    objective = VPiTObjective(model)
    params = W.trainable(objective, "full")
    batch = objective.batch(
        W.conversations(model, [SEQUENCE] * BATCH, ["understanding"] * BATCH), 0
    )
    image_token = model.backbone.causal_lm.config.vocab_size - 1  # a row the tokenizer never uses
    if image_token < len(model.backbone.tokenizer):
        raise SystemExit("the backbone has no spare embedding row for LLaVA's image token")
    llava = W.build_llava(model, image_token)
    lbatch = W.llava_batch(batch, image_token)
    llava_params = [p for p in llava.parameters() if p.requires_grad]
    model.train()
    llava.train()
    diffs = {}
    for label, bf16 in DTYPES.items():
        with torch.no_grad(), W.autocast(args.device, bf16):
            ours, theirs = W.vpit_loss(objective, batch)(), W.llava_loss(llava, lbatch)()
        diffs[label] = W.check_close(
            f"LLaVA {label}", ours.item(), theirs.item(), 1e-5 if not bf16 else 2e-2
        )
    flops = W.step_flops(model, batch)
    tokens = {"tokens": float(sum(W.sample_lengths(batch)))}
    cfg = {
        "batch": BATCH,
        "sequence": SEQUENCE,
        "images": BATCH,
        "labelled_tokens": int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()),
        "model_gflop": flops / 1e9,
    }
    for label, bf16 in DTYPES.items():
        c = {**cfg, "dtype": label, "loss_rel_diff": diffs[label]}
        theirs_r, ours_r = suite.measure(
            Case(
                f"understanding {label}: transformers LLaVA",
                W.Step(W.llava_loss(llava, lbatch), llava_params, args.device, bf16),
                c,
                tokens,
            ),
            Case(
                f"understanding {label}: metamorph",
                W.Step(W.vpit_loss(objective, batch), params, args.device, bf16),
                c,
                tokens,
            ),
            repeats=args.repeats,
        )
        for r in (theirs_r, ours_r):
            add_mfu(r, flops, peaks[label])
        assert ours_r.speedup is not None
        suite.target(
            f"metamorph's step not slower than LLaVA's ({label})",
            ours_r.speedup >= 1.0,
            f"{ours_r.speedup:.2f}x",
        )
    del llava, llava_params


def generation_step(
    suite: Suite, model: Any, args: argparse.Namespace, peaks: dict[str, float]
) -> None:
    """The VPiT step with a generation target, encoder live vs a feature cache."""
    objective = VPiTObjective(model)
    params = W.trainable(objective, "full")
    convs = W.conversations(model, [SEQUENCE] * BATCH, ["generation"] * BATCH, seed=1)
    live = objective.batch(convs, 0)
    cache = objective.batch(W.cached(model, convs), 0)
    assert "pixel_values" in live and "image_features" in cache
    model.train()
    with torch.no_grad():
        a = objective.loss_sums(model, live)
        b = objective.loss_sums(model, cache)
    for term, x, y in zip(objective.terms, a, b, strict=True):
        W.check_close(f"feature cache, {term} loss", x.item(), y.item(), 1e-5)
    tokens = {"tokens": float(sum(W.sample_lengths(live)))}
    cfg = {"batch": BATCH, "sequence": SEQUENCE, "target_images": BATCH}
    flops_live = W.step_flops(model, live)
    flops_cache = W.step_flops(model, cache, encoder_runs=False)
    for label, bf16 in DTYPES.items():
        results = suite.measure(
            Case(
                f"generation target {label}: encoder live",
                W.Step(W.vpit_loss(objective, live), params, args.device, bf16),
                {**cfg, "dtype": label, "model_gflop": flops_live / 1e9},
                tokens,
            ),
            Case(
                f"generation target {label}: feature cache",
                W.Step(W.vpit_loss(objective, cache), params, args.device, bf16),
                {**cfg, "dtype": label, "model_gflop": flops_cache / 1e9},
                tokens,
            ),
            repeats=args.repeats,
        )
        add_mfu(results[0], flops_live, peaks[label])
        add_mfu(results[1], flops_cache, peaks[label])


def packing(suite: Suite, model: Any, args: argparse.Namespace, peaks: dict[str, float]) -> None:
    """Packing vs padding on a length-skewed batch (fp32)."""
    kinds = ["understanding", "generation"] * (len(SKEWED) // 2)
    convs = W.conversations(model, SKEWED, kinds, seed=2)
    padded_obj, packed_obj = VPiTObjective(model), VPiTObjective(model, pack_to=SEQUENCE)
    params = W.trainable(padded_obj, "full")
    padded, packed = padded_obj.batch(convs, 0), packed_obj.batch(convs, 0)
    if W.sample_lengths(padded) != W.sample_lengths(packed):
        raise SystemExit("packing changed the samples' lengths")
    model.train()
    with torch.no_grad():
        a = padded_obj.loss_sums(model, padded)
        b = packed_obj.loss_sums(model, packed)
    for term, x, y in zip(padded_obj.terms, a, b, strict=True):
        W.check_close(f"packing, {term} loss sum", x.item(), y.item(), 1e-4)
    real = float(sum(SKEWED))
    cfg = {"samples": len(SKEWED), "lengths": SKEWED, "dtype": "fp32"}
    flops = W.step_flops(model, padded)  # model FLOPs count real tokens only: same for both
    results = suite.measure(
        Case(
            "skewed batch: padding",
            W.Step(W.vpit_loss(padded_obj, padded), params, args.device),
            {**cfg, "rows": list(padded["input_ids"].shape)},
            {"real tokens": real},
        ),
        Case(
            "skewed batch: packing",
            W.Step(W.vpit_loss(packed_obj, packed), params, args.device),
            {**cfg, "rows": list(packed["input_ids"].shape)},
            {"real tokens": real},
        ),
        repeats=args.repeats,
    )
    for r in results:
        add_mfu(r, flops, peaks["fp32"])


def memory_child(args: argparse.Namespace) -> int:
    """In a fresh process: build the model, two steps of the generation batch with the
    ``full`` or ``lora`` recipe; print the memory figures as one JSON line."""
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)  # peft on transformers 5
    apply_threads(args)
    with tempfile.TemporaryDirectory() as tmp:
        model = build(Path(tmp), args.smoke, args.device)
    recipe = "lora" if args.memory_child == "lora" else "full"
    if recipe == "lora":
        model.apply_lora(r=16, alpha=32)
    chunk = LOSS_CHUNK if args.memory_child == "text-chunked" else None
    objective = VPiTObjective(model, loss_chunk=chunk)
    params = W.trainable(objective, recipe)
    # text-heavy (understanding, the answer filling the sample) for the chunked comparison
    kind = "understanding" if args.memory_child.startswith("text") else "generation"
    convs = W.conversations(model, [SEQUENCE] * BATCH, [kind] * BATCH, seed=1)
    batch = objective.batch(convs, 0)
    built = current_rss_mib()
    reset = reset_peak_memory()
    model.train()
    step = W.Step(W.vpit_loss(objective, batch), params, args.device)
    for _ in range(2):
        step()
    peaks = peak_memory()
    out = {
        **W.state_mib(model, step.optimizer),
        "MiB peak RSS while training": peaks.get("MiB peak RSS since reset") if reset else None,
        "MiB peak CUDA allocated": peaks.get("MiB peak CUDA allocated"),
        "MiB RSS after build": built,
        "MiB peak RSS of the process (build included)": peaks["MiB peak RSS"],
        "M trainable params": sum(p.numel() for p in params) / 1e6,
    }
    print(json.dumps({k: v for k, v in out.items() if v is not None}))
    return 0


def memory(suite: Suite, args: argparse.Namespace) -> None:
    figures = {}
    for recipe in ("full", "lora", "text", "text-chunked"):
        child = [__file__, "--memory-child", recipe, "--device", args.device]
        child += ["--smoke"] if args.smoke else []
        child += ["--threads", str(args.threads)] if args.threads else []
        # a fixed mmap threshold: freed tensors go back to the OS at once, so that the RSS
        # follows the live tensors (glibc's adaptive threshold keeps freed blocks resident)
        figures[recipe] = run_json_subprocess(child, 600, {"MALLOC_MMAP_THRESHOLD_": "131072"})
        cfg = {"recipe": recipe, "batch": BATCH, "sequence": SEQUENCE, "steps": 2}
        if recipe == "lora":
            cfg.update(r=16, alpha=32, target_modules="all-linear")
        if recipe.startswith("text"):
            cfg.update(recipe="full", batch_kind="understanding (answers fill the samples)")
        if recipe == "text-chunked":
            cfg.update(loss_chunk=LOSS_CHUNK)
        suite.record(f"peak memory: {recipe} (own process)", figures[recipe], cfg)
    key = "MiB peak CUDA allocated" if args.device != "cpu" else "MiB peak RSS while training"
    if key not in figures["full"]:
        key = "MiB peak RSS of the process (build included)"
    full, lora = figures["full"][key], figures["lora"][key]
    suite.note(f"LoRA peak memory {lora:,.0f} MiB = {lora / full:.2f}x full's {full:,.0f} ({key})")
    text, chunked = figures["text"][key], figures["text-chunked"][key]
    suite.note(
        f"text-heavy batch: peak {text:,.0f} MiB whole, {chunked:,.0f} MiB with "
        f"objective.loss_chunk={LOSS_CHUNK} ({key})"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--parts",
        default="llava,generation,packing,memory",
        help="comma-separated parts to run (the matmul peak always runs)",
    )
    parser.add_argument(
        "--memory-child", choices=("full", "lora", "text", "text-chunked"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.memory_child:
        return memory_child(args)
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    apply_threads(args)
    if args.smoke:
        args.repeats = 1
    parts = set(args.parts.split(","))
    name = "training" + ("" if args.device == "cpu" else f"-{args.device}")
    suite = Suite(name, command_line("bench_training.py"), wait=not args.no_wait)
    peaks = measure_peaks(suite, args, *((256, 1) if args.smoke else (2048, 4)))
    with tempfile.TemporaryDirectory() as tmp:
        model = build(Path(tmp), args.smoke, args.device)
    if "llava" in parts:
        llava_comparison(suite, model, args, peaks)
    if "generation" in parts:
        generation_step(suite, model, args, peaks)
    if "packing" in parts:
        packing(suite, model, args, peaks)
    del model
    if "memory" in parts:
        memory(suite, args)
    json_path, md_path = suite.write(results_dir(args))
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
