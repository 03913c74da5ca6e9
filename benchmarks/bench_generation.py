"""Generation speed (issue #6), on one set of random weights (fp32):

- visual tokens per second with the KV cache against
  - the research code's loop (``greedy_decode`` in facebookresearch/metamorph, re-implemented
    here: one prompt at a time, no cache, every step a full forward over the whole sequence
    *with vocabulary logits at every position*, as its ``LlamaForCausalLM`` forward computes
    them, then the vision head and projector at the last position), at batch 1;
  - our own recompute loop (``use_cache=False``: the same loop as the cached one, the whole
    sequence recomputed per step, logits only where needed, batched), at batch 1 and 8;
  from a 128-token prompt ending in ``<image_start>`` (64 visual tokens each);
- text tokens per second against transformers' own ``generate`` on the bare backbone (greedy,
  same prompt and number of new tokens, EOS ignored by both);
- the cost of classifier-free guidance on visual tokens (an unconditional row per sample).

Before timing, the outputs compared are checked equal (text ids identical, visual tokens
within 1e-4). The backbone is Llama-style: hidden 512, 8 layers, 8 heads, MLP 1536,
vocabulary 32000; the encoder side has the paper's shapes (64 tokens of width 1152,
mlp2x_gelu projector and head).

    .venv/bin/python benchmarks/bench_generation.py [--repeats 3] [--device cpu] [--smoke]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import transformers
import workloads as W
from harness import Case, Suite, add_common_arguments, apply_threads, command_line, results_dir

from metamorph_core import MetaMorphModel
from metamorph_core.generation import (
    DoneEvent,
    EncodedPrompt,
    GenerationConfig,
    GenerationResult,
    stream_encoded,
)
from metamorph_core.sequence import EncodedSample
from metamorph_core.testing import build_tiny_tokenizer

PROMPT_TOKENS = 128
NEW_TEXT_TOKENS = 64
BACKBONE = {"model_type": "llama", **W.MID_BACKBONE}
TINY_BACKBONE = {"model_type": "llama", **W.TINY_BACKBONE}  # --smoke


def build_model(
    tmp: Path, device: str, backbone: dict | None = None, tokenizer: Any = None
) -> MetaMorphModel:
    """The benchmark model (``backbone``: a config dict, default the mid-size one) on the tiny
    tokenizer, or on ``tokenizer`` when given (saved into ``tmp``)."""
    (tokenizer or build_tiny_tokenizer("llama")).save_pretrained(str(tmp / "tokenizer"))
    config = {
        "encoder": {
            "name": "tiny-patch",
            "kwargs": {"image_size": 32, "patch_size": 4, "hidden_size": 1152, "num_tokens": 64},
        },
        "backbone": {
            "name": "llama",
            "kwargs": {
                "tokenizer": str(tmp / "tokenizer"),
                "config": backbone or BACKBONE,
                "seed": 0,
            },
        },
        "projector": "mlp2x_gelu",
        "head": "mlp2x_gelu",
        "template": "llama3",
    }
    torch.manual_seed(0)
    return MetaMorphModel.from_config(config).to(device).eval()


def encoded(ids: list[int]) -> EncodedSample:
    return EncodedSample(input_ids=ids, labels=[], image_slots=[], image_targets=[])


def prompts(
    model: MetaMorphModel, batch: int, image: bool, guided: bool = False
) -> list[EncodedPrompt]:
    """``batch`` random 128-token prompts (ending in ``<image_start>`` when ``image``); under
    guidance each has a short unconditional prompt, as a dropped prompt is."""
    g = torch.Generator().manual_seed(batch)
    vocab = len(model.backbone.tokenizer) - 2  # not the image tokens
    start = [model.backbone.image_start_id] if image else []
    out = []
    for _ in range(batch):
        ids = torch.randint(0, vocab, (PROMPT_TOKENS - len(start),), generator=g).tolist()
        uncond = encoded(ids[:8] + start) if guided else None
        out.append(EncodedPrompt(encoded(ids + start), uncond))
    return out


def research_loop(model: MetaMorphModel, prompt: EncodedPrompt) -> torch.Tensor:
    """The research code's image loop for one prompt ending in ``<image_start>``: per visual
    token a forward over the whole sequence, vocabulary logits at every position, then the
    normalised head output at the last position goes back in through the projector.
    Returns the ``(n, c)`` visual tokens."""
    bb = model.backbone
    with torch.no_grad():
        device = next(bb.parameters()).device
        embeds = bb.embed(torch.tensor([prompt.sample.input_ids], device=device))
        tokens = []
        for _ in range(model.num_image_tokens):
            hidden = bb(embeds).hidden_states  # (1, l, d)
            bb.logits(hidden).float()  # what the research code's forward computes each step
            token = torch.nn.functional.normalize(model.head(hidden[:, -1]), dim=-1)  # (1, c)
            tokens.append(token[0])
            embeds = torch.cat([embeds, model.projector(token)[:, None]], dim=1)
    return torch.stack(tokens)


def generate(
    model: MetaMorphModel, batch: list[EncodedPrompt], config: GenerationConfig, image: bool
) -> list[GenerationResult]:
    events = stream_encoded(model, batch, config, force_image=image)
    return [e.result for e in events if isinstance(e, DoneEvent)]


def check_same_images(a: list[GenerationResult], b: list[GenerationResult], batch: int) -> float:
    """The largest difference between two runs' visual tokens (an error above 1e-4)."""
    diff = max((x.images[0] - y.images[0]).abs().max().item() for x, y in zip(a, b, strict=True))
    if diff > 1e-4:
        raise SystemExit(f"batch {batch}: cached and recomputed visual tokens differ by {diff:.2e}")
    return diff


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    args = parser.parse_args()
    apply_threads(args)
    if args.smoke:
        args.repeats, args.batches = 1, "1,2"
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    name = "generation" + ("" if args.device == "cpu" else f"-{args.device}")
    suite = Suite(name, command_line("bench_generation.py"), wait=not args.no_wait)
    batches = [int(b) for b in args.batches.split(",")]
    reps = {"repeats": args.repeats}

    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(Path(tmp), args.device, TINY_BACKBONE if args.smoke else None)
    n = model.num_image_tokens
    cached, recompute = GenerationConfig(), GenerationConfig(use_cache=False)
    guided = GenerationConfig(visual_guidance_scale=3.0)
    static = GenerationConfig(cache_implementation="static")
    # the step compiled by inductor: a minute per shape on the CPU (in the warm-up), so not in
    # a smoke run
    compiled = None if args.smoke else GenerationConfig(cache_implementation="static", compile=True)
    for b in batches:
        batch = prompts(model, b, image=True)
        fast = generate(model, batch, cached, True)
        diff = check_same_images(fast, generate(model, batch, recompute, True), b)
        cfg = {"batch": b, "prompt_tokens": PROMPT_TOKENS, "visual_tokens": n}
        counts = {"visual tokens": b * n}
        cases = [
            Case(
                f"image b{b}: recompute loop",
                lambda batch=batch: generate(model, batch, recompute, True),
                {**cfg, "use_cache": False},
                counts,
            ),
            Case(
                f"image b{b}: KV cache",
                lambda batch=batch: generate(model, batch, cached, True),
                {**cfg, "use_cache": True, "max_abs_diff_vs_recompute": diff},
                counts,
            ),
        ]
        if b == 1:  # the research code decodes one prompt at a time
            research = research_loop(model, batch[0])
            gap = (research - fast[0].images[0]).abs().max().item()
            if gap > 1e-4:
                raise SystemExit(f"the research loop's visual tokens differ from ours by {gap}")
            cases.insert(
                0,
                Case(
                    "image b1: research code's loop",
                    lambda batch=batch: research_loop(model, batch[0]),
                    {**cfg, "max_abs_diff_vs_cached": gap},
                    counts,
                ),
            )
        # the recompute loop at batch 8 takes about half a minute a run on 2 CPU cores
        slow = {"warmup": 0, "repeats": min(2, args.repeats)}
        suite.measure(*cases, **(slow if b > 1 else reps))
        guided_batch = prompts(model, b, image=True, guided=True)
        suite.measure(
            Case(
                f"image b{b}: KV cache + guidance 3.0",
                lambda batch=guided_batch: generate(model, batch, guided, True),
                {**cfg, "visual_guidance_scale": 3.0, "uncond_prompt_tokens": 9},
                counts,
            ),
            baseline=f"image b{b}: KV cache",
            **reps,
        )
        variants = {"static cache": static, "static cache, compiled step": compiled}
        cases = []
        for label, config in variants.items():
            if config is not None:
                check_same_images(fast, generate(model, batch, config, True), b)
                cases.append(
                    Case(
                        f"image b{b}: {label}",
                        lambda batch=batch, c=config: generate(model, batch, c, True),
                        {**cfg, "cache_implementation": "static", "compile": config.compile},
                        counts,
                    )
                )
        suite.measure(*cases, baseline=f"image b{b}: KV cache", **reps)
        if b == 1 and compiled is not None:
            research = suite.get("image b1: research code's loop").median_s
            ours = suite.get("image b1: static cache, compiled step").median_s
            suite.note(f"b1 compiled step vs the research code's loop: {research / ours:.1f}x")

    lm = model.backbone.causal_lm
    lm.generation_config.eos_token_id = None  # both run to the token budget
    lm.generation_config.pad_token_id = model.sequence_builder.pad_id
    text = GenerationConfig(max_new_tokens=NEW_TEXT_TOKENS, ignore_eos=True)
    for b in batches:
        batch = prompts(model, b, image=False)
        ids = torch.tensor([p.sample.input_ids for p in batch], device=args.device)

        def hf(ids: torch.Tensor = ids) -> torch.Tensor:
            with torch.no_grad():
                out = lm.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=NEW_TEXT_TOKENS,
                    do_sample=False,
                )
            return out[:, ids.shape[1] :]

        if [r.token_ids for r in generate(model, batch, text, False)] != hf().tolist():
            raise SystemExit(f"batch {b}: our greedy text differs from transformers' generate")
        cfg = {"batch": b, "prompt_tokens": PROMPT_TOKENS, "new_tokens": NEW_TEXT_TOKENS}
        counts = {"text tokens": b * NEW_TEXT_TOKENS}
        cases = [
            Case(f"text b{b}: transformers generate", hf, cfg, counts),
            Case(
                f"text b{b}: metamorph generate",
                lambda batch=batch: generate(model, batch, text, False),
                cfg,
                counts,
            ),
        ]
        if compiled is not None:
            fast_text = dataclasses.replace(text, cache_implementation="static", compile=True)
            if [r.token_ids for r in generate(model, batch, fast_text, False)] != hf().tolist():
                raise SystemExit(f"batch {b}: our compiled text differs from transformers'")
            cases.append(
                Case(
                    f"text b{b}: metamorph, static cache, compiled step",
                    lambda batch=batch, c=fast_text: generate(model, batch, c, False),
                    {**cfg, "cache_implementation": "static", "compile": True},
                    counts,
                )
            )
        suite.measure(*cases, **reps)

    json_path, md_path = suite.write(results_dir(args))
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
