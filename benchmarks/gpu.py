"""The GPU variant of the benchmarks (issue #8, part 5): bf16 autocast, SDPA attention, random
weights of realistic shapes created directly on the GPU (no CPU initialisation, nothing
downloaded), bounded step counts, written to finish in at most 6 minutes (``--budget-s``).

Sections, each in its own process (its peak memory is its own, and a section that fails or
runs out of memory does not take the others with it); the parent measures the GPU's bf16
matmul peak first and hands it to each section for MFU:

- ``train-1b``: Llama-3.2-1B-shaped backbone (fp32 master weights, bf16 autocast, ``full``
  recipe) with a SigLIP so400m-shaped encoder (width 1152, 27 blocks, 14 px patches at 384 px:
  27x27 patches reduced to 64 tokens, frozen): the VPiT step with a generation target, batch
  8 x 1024, encoder live vs feature cache; peak CUDA memory.
- ``llava-1b``: the same 1B backbone and encoder against transformers'
  ``LlavaForConditionalGeneration`` with the same weights (understanding, batch 4 x 1024). LLaVA
  cannot reduce the patch grid, so here both models take all 729 patches; losses checked equal
  (fp32) before timing.
- ``lora-8b``: Llama-3-8B-shaped backbone in bf16 weights with LoRA (r 16, all linear layers,
  the ``lora`` recipe) and the so400m encoder: the generation-target step, batch 4 x 1024; peak
  CUDA memory.
- ``generate-1b``: the 1B model in bf16: visual tokens/s with the KV cache vs the recompute
  loop, the static cache and the static cache with the step compiled (CUDA graphs), batch 1
  and 8, from 128-token prompts (as ``bench_generation.py``); text tokens/s with the static
  cache and CUDA graphs against transformers' ``generate`` with its static cache (which it
  compiles on CUDA).
- ``qlora-8b``: the 8B backbone loaded in 4-bit NF4 (``quantize="nf4"``, from random bf16
  weights saved in the run's temporary directory) with LoRA r16: the step at batch 4 x 1024
  and its peak memory.

MFU counts model FLOPs as ``workloads.py`` says (a LoRA backbone's frozen weights at 4 FLOPs
per parameter and token). ``--smoke`` runs every section on tiny shapes (on the CPU when there
is no GPU) to check the code path; its figures mean nothing.

    .venv/bin/python benchmarks/gpu.py [--device cuda] [--budget-s 360] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
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
    peak_memory,
    reset_peak_memory,
    results_dir,
)

from metamorph_train.objectives import VPiTObjective

SECTIONS = ("train-1b", "llava-1b", "lora-8b", "generate-1b", "qlora-8b")


@dataclass(frozen=True)
class Shapes:
    small: dict[str, Any]  # the 1B-class backbone
    large: dict[str, Any]  # the 8B-class backbone
    encoder: dict[str, Any]
    sequence: int
    batch: int  # train-1b
    pair_batch: int  # llava-1b, lora-8b
    matmul: int


REAL = Shapes(W.LLAMA_1B, W.LLAMA_8B, W.SO400M, 1024, 8, 4, 8192)
SMOKE = Shapes(
    W.TINY_LLAMA_GQA,
    {**W.TINY_LLAMA_GQA, "num_hidden_layers": 3},
    W.TINY_SO400M,
    200,
    2,
    2,
    256,
)


def add_mfu(result: Result, flops: float, peak_gflops: float) -> None:
    achieved = flops / result.median_s / 1e9
    result.figures["TFLOP/s"] = achieved / 1e3
    result.figures["% MFU"] = 100 * achieved / peak_gflops


def record_memory(
    suite: Suite, name: str, config: dict[str, Any], model: Any, step: W.Step
) -> float | None:
    """Peak memory since the last reset (CUDA allocations; RSS on the CPU) and the exact size
    of the weights, gradients and optimizer state after ``step``; returns the CUDA peak in GiB
    (``None`` on the CPU)."""
    figures = {k: v for k, v in peak_memory().items() if "CUDA" in k or "since reset" in k}
    suite.record(name, {**figures, **W.state_mib(model, step.optimizer)}, config)
    cuda = figures.get("MiB peak CUDA allocated")
    return None if cuda is None else cuda / 1024


# -- sections (each runs in a process of its own) --------------------------------------------
def train_1b(suite: Suite, args: argparse.Namespace, s: Shapes, tmp: Path) -> None:
    model = W.build_random_model(tmp, s.small, s.encoder, args.device)
    objective = VPiTObjective(model)
    params = W.trainable(objective, "full")
    convs = W.conversations(model, [s.sequence] * s.batch, ["generation"] * s.batch)
    live = objective.batch(convs, 0)
    cache = objective.batch(W.cached(model, convs), 0)
    model.train()
    with torch.no_grad():
        for term, a, b in zip(
            objective.terms,
            objective.loss_sums(model, live),
            objective.loss_sums(model, cache),
            strict=True,
        ):
            W.check_close(f"feature cache, {term}", a.item(), b.item(), 1e-4)
    cfg = {"backbone": "1B", "batch": s.batch, "sequence": s.sequence, "dtype": "bf16 autocast"}
    tokens = {"tokens": float(sum(W.sample_lengths(live)))}
    step_live = W.Step(W.vpit_loss(objective, live), params, args.device, bf16=True)
    step_cache = W.Step(W.vpit_loss(objective, cache), params, args.device, bf16=True)
    reset_peak_memory()
    step_live()
    record_memory(suite, "1B full: peak memory of a step", cfg, model, step_live)
    live_r, cache_r = suite.measure(
        Case("1B full, generation target: encoder live", step_live, cfg, tokens),
        Case("1B full, generation target: feature cache", step_cache, cfg, tokens),
        warmup=2,
        repeats=args.repeats,
    )
    add_mfu(live_r, W.step_flops(model, live), args.peak_gflops)
    add_mfu(cache_r, W.step_flops(model, cache, encoder_runs=False), args.peak_gflops)


def llava_1b(suite: Suite, args: argparse.Namespace, s: Shapes, tmp: Path) -> None:
    model = W.build_random_model(tmp, s.small, s.encoder, args.device, num_tokens=None)
    objective = VPiTObjective(model)
    params = W.trainable(objective, "full")
    convs = W.conversations(model, [s.sequence] * s.pair_batch, ["understanding"] * s.pair_batch)
    batch = objective.batch(convs, 0)
    image_token = model.backbone.causal_lm.config.vocab_size - 1
    llava = W.build_llava(model, image_token)
    lbatch = W.llava_batch(batch, image_token)
    model.train()
    llava.train()
    with torch.no_grad():
        diff = W.check_close(
            "LLaVA fp32",
            W.vpit_loss(objective, batch)().item(),
            W.llava_loss(llava, lbatch)().item(),
            1e-4,
        )
    cfg = {
        "backbone": "1B",
        "batch": s.pair_batch,
        "sequence": s.sequence,
        "image_tokens": model.num_image_tokens,
        "dtype": "bf16 autocast",
        "loss_rel_diff_fp32": diff,
    }
    tokens = {"tokens": float(sum(W.sample_lengths(batch)))}
    theirs, ours = suite.measure(
        Case(
            "1B understanding: transformers LLaVA",
            W.Step(
                W.llava_loss(llava, lbatch),
                [p for p in llava.parameters() if p.requires_grad],
                args.device,
                bf16=True,
            ),
            cfg,
            tokens,
        ),
        Case(
            "1B understanding: metamorph",
            W.Step(W.vpit_loss(objective, batch), params, args.device, bf16=True),
            cfg,
            tokens,
        ),
        warmup=2,
        repeats=args.repeats,
    )
    flops = W.step_flops(model, batch)
    add_mfu(theirs, flops, args.peak_gflops)
    add_mfu(ours, flops, args.peak_gflops)
    assert ours.speedup is not None
    suite.target(
        "metamorph's 1B step not slower than LLaVA's", ours.speedup >= 1.0, f"{ours.speedup:.2f}x"
    )


def lora_8b(suite: Suite, args: argparse.Namespace, s: Shapes, tmp: Path) -> None:
    model = W.build_random_model(tmp, s.large, s.encoder, args.device, dtype="bfloat16")
    lora_step(suite, args, s, model, "8B LoRA", "8B, bf16 weights, LoRA r16 all-linear")


def lora_step(
    suite: Suite, args: argparse.Namespace, s: Shapes, model: Any, label: str, backbone: str
) -> float | None:
    """LoRA r16 on every linear layer of ``model``'s backbone: the generation-target step at
    ``pair_batch`` x ``sequence``, its peak memory (returned in GiB on CUDA), tokens/s and
    MFU."""
    model.apply_lora(r=16, alpha=32)
    objective = VPiTObjective(model)
    params = W.trainable(objective, "lora")
    lora = sum(
        p.numel() for n, p in model.named_parameters() if p.requires_grad and "backbone." in n
    )
    convs = W.conversations(model, [s.sequence] * s.pair_batch, ["generation"] * s.pair_batch)
    batch = objective.batch(convs, 0)
    model.train()
    cfg = {
        "backbone": backbone,
        "batch": s.pair_batch,
        "sequence": s.sequence,
        "dtype": "bf16 autocast",
        "trainable_M": sum(p.numel() for p in params) / 1e6,
    }
    step = W.Step(W.vpit_loss(objective, batch), params, args.device, bf16=True)
    reset_peak_memory()
    step()
    peak = record_memory(suite, f"{label}: peak memory of a step", cfg, model, step)
    tokens = {"tokens": float(sum(W.sample_lengths(batch)))}
    (r,) = suite.measure(
        Case(f"{label}, generation target", step, cfg, tokens), warmup=1, repeats=args.repeats
    )
    add_mfu(r, W.step_flops(model, batch, backbone="lora", lora_params=lora), args.peak_gflops)
    return peak


def generate_1b(suite: Suite, args: argparse.Namespace, s: Shapes, tmp: Path) -> None:
    import bench_generation as G

    from metamorph_core.generation import GenerationConfig

    model = W.build_random_model(tmp, s.small, s.encoder, args.device, dtype="bfloat16").eval()
    cached, recompute = GenerationConfig(), GenerationConfig(use_cache=False)
    static = GenerationConfig(cache_implementation="static")
    # CUDA graphs on a GPU; a smoke run on the CPU leaves the compiled cases out (inductor's
    # CPU compile takes a minute per shape and needs a C++ compiler)
    cuda = args.device.startswith("cuda")
    graphs = GenerationConfig(cache_implementation="static", compile=True)
    ours = "static cache + CUDA graphs" if cuda else "static cache"
    n = model.num_image_tokens
    for b in (1, 8):
        batch = G.prompts(model, b, image=True)
        fast = G.generate(model, batch, cached, True)
        slow = G.generate(model, batch, recompute, True)
        diff = max(
            (x.images[0] - y.images[0]).abs().max().item() for x, y in zip(fast, slow, strict=True)
        )
        if diff > 0.1:  # unit vectors; bf16 kernels differ between the two paths
            raise SystemExit(f"batch {b}: cached and recomputed visual tokens differ by {diff}")
        cfg = {"batch": b, "prompt_tokens": G.PROMPT_TOKENS, "dtype": "bf16 weights", "diff": diff}
        configs = {"recompute loop": recompute, "KV cache": cached, "static cache": static}
        if cuda:
            configs["static cache + CUDA graphs"] = graphs
        suite.measure(
            *(
                Case(
                    f"1B image b{b}: {name}",
                    lambda batch=batch, c=c: G.generate(model, batch, c, True),
                    cfg,
                    {"visual tokens": b * n},
                )
                for name, c in configs.items()
            ),
            warmup=2,  # the first call of a shape compiles and captures
            repeats=args.repeats,
        )
    targets = {1: 300.0, 8: 2000.0}
    for r in suite.results:
        if r.name.endswith("CUDA graphs") and "visual tokens/s" in r.figures:
            b = r.config["batch"]
            rate = r.figures["visual tokens/s"]
            met = rate >= targets[b]
            suite.target(
                f"1B visual tokens/s at batch {b} >= {targets[b]:.0f}", met, f"{rate:.0f}/s"
            )
    lm = model.backbone.causal_lm
    lm.generation_config.eos_token_id = None  # both run to the token budget
    lm.generation_config.pad_token_id = model.sequence_builder.pad_id
    text = GenerationConfig(
        max_new_tokens=G.NEW_TEXT_TOKENS,
        ignore_eos=True,
        cache_implementation="static",
        compile=cuda,
    )
    for b in (1, 8):
        batch = G.prompts(model, b, image=False)
        ids = torch.tensor([p.sample.input_ids for p in batch], device=args.device)

        def hf(ids: torch.Tensor = ids) -> torch.Tensor:
            with torch.no_grad():  # transformers compiles its static-cache decoding on CUDA
                out = lm.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=G.NEW_TEXT_TOKENS,
                    do_sample=False,
                    cache_implementation="static",
                )
            return out[:, ids.shape[1] :]

        cfg = {"batch": b, "prompt_tokens": G.PROMPT_TOKENS, "new_tokens": G.NEW_TEXT_TOKENS}
        counts = {"text tokens": b * G.NEW_TEXT_TOKENS}
        suite.measure(
            Case(f"1B text b{b}: transformers generate, static cache", hf, cfg, counts),
            Case(
                f"1B text b{b}: metamorph, {ours}",
                lambda batch=batch: G.generate(model, batch, text, False),
                cfg,
                counts,
            ),
            warmup=2,
            repeats=args.repeats,
        )


def qlora_8b(suite: Suite, args: argparse.Namespace, s: Shapes, tmp: Path) -> None:
    """The 8B-shaped LLM (random bf16 weights saved once) loaded through the backbone's
    ``quantize="nf4"`` (QLoRA), LoRA r16 on every linear layer, the so400m encoder: the
    generation-target step at batch 4 x 1024 and its peak memory (target <= 24 GiB)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from metamorph_core import MetaMorphModel
    from metamorph_core.testing import build_tiny_tokenizer

    path = tmp / "llm"
    with torch.device(args.device):
        config = AutoConfig.for_model("llama", **s.large)
        lm = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    lm.save_pretrained(str(path))
    build_tiny_tokenizer("llama").save_pretrained(str(path))
    del lm
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    backbone = {"pretrained": str(path), "dtype": "bfloat16", "quantize": "nf4"}
    backbone["attn_implementation"] = "sdpa"
    encoder = {"config": s.encoder, "dtype": "bfloat16", "seed": 0, "attn_implementation": "sdpa"}
    torch.manual_seed(0)
    model = MetaMorphModel.from_config(W.model_config(encoder, backbone, 64)).to(args.device)
    described = "8B, NF4 base weights (double quantisation), LoRA r16 all-linear"
    peak = lora_step(suite, args, s, model, "8B QLoRA", described)
    if peak is not None:
        suite.target("8B QLoRA step peak <= 24 GiB", peak <= 24.0, f"{peak:.1f} GiB")


RUN: dict[str, Callable[[Suite, argparse.Namespace, Shapes, Path], None]] = {
    "train-1b": train_1b,
    "llava-1b": llava_1b,
    "lora-8b": lora_8b,
    "generate-1b": generate_1b,
    "qlora-8b": qlora_8b,
}


# -- driver ----------------------------------------------------------------------------------
def child(args: argparse.Namespace) -> int:
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    suite = Suite(args.section, command_line("gpu.py"), wait=not args.no_wait)
    with tempfile.TemporaryDirectory() as tmp:
        RUN[args.section](suite, args, SMOKE if args.smoke else REAL, Path(tmp))
    suite.write(args.child_out)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, repeats=5)
    parser.add_argument("--device", default="cuda")
    parser.add_argument(
        "--budget-s", type=float, default=360.0, help="stop starting sections after"
    )
    parser.add_argument("--sections", default=",".join(SECTIONS))
    parser.add_argument("--section", choices=SECTIONS, help=argparse.SUPPRESS)
    parser.add_argument("--peak-gflops", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    apply_threads(args)
    if args.smoke:
        args.repeats = 1
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            args.device = "cpu"
    if args.section:
        return child(args)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here; run with --smoke to check the code path on CPU")
    began = time.perf_counter()
    shapes = SMOKE if args.smoke else REAL
    suite = Suite("gpu-smoke" if args.smoke else "gpu", command_line("gpu.py"), wait=False)
    fn, gflop = W.matmul_peak_case(shapes.matmul, torch.bfloat16, args.device, repeat=10)
    (peak,) = suite.measure(
        Case(f"matmul peak bf16 (10 x {shapes.matmul}^3)", fn, {}, {"GFLOP": gflop}),
        warmup=2,
        repeats=5,
    )
    peak_gflops = gflop / min(peak.runs)  # the best run
    peak.figures["GFLOP/s peak (best run)"] = peak_gflops
    out = Path(tempfile.mkdtemp(prefix="metamorph-gpu-bench-"))
    for section in args.sections.split(","):
        left = args.budget_s - (time.perf_counter() - began)
        if left < 30:
            suite.note(f"{section}: not run, the {args.budget_s:.0f} s budget was spent")
            continue
        command = [sys.executable, __file__, "--section", section, "--device", args.device]
        command += ["--peak-gflops", str(peak_gflops), "--child-out", str(out / section)]
        command += ["--repeats", str(args.repeats)] + ["--smoke"] * args.smoke
        command += ["--no-wait"] * args.no_wait
        try:
            subprocess.run(command, check=True, timeout=left)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
            suite.note(f"{section}: FAILED ({type(e).__name__}: {e})")
            continue
        suite.merge(out / section / f"{section}.json")
    suite.note(f"whole run: {time.perf_counter() - began:.0f} s (budget {args.budget_s:.0f} s)")
    json_path, md_path = suite.write(results_dir(args))
    print(f"wrote {json_path} and {md_path}")
    print(json.dumps({"seconds": round(time.perf_counter() - began, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
