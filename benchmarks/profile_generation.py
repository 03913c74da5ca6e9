"""Where the cached generation loop spends its time (issue #8's GPU run, session 9): the 1B
model of ``gpu.py`` in bf16, ms per step of our image loop (batch 1 and 8), our text loop
against transformers' ``generate`` on the bare backbone (greedy, 64 tokens from 128-token
prompts), and a ``torch.profiler`` table of one cached batch-8 image generation (sorted by
self CPU time). On the CPU it uses tiny shapes (a code-path check; the figures mean nothing).

    .venv/bin/python benchmarks/profile_generation.py [--out DIR]

Writes ``gen_times.txt`` and ``gen_profile.txt`` to ``--out`` (default: a temporary
directory).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import bench_generation as G
import torch
import transformers
import workloads as W
from torch.profiler import ProfilerActivity, profile

from metamorph_core.generation import GenerationConfig

STEPS = 64


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="metamorph-genprof-"))
    out.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    transformers.utils.logging.set_verbosity_error()

    def best(fn: Callable[[], object], repeats: int = 3) -> float:
        fn()
        sync()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t)
        return min(times)

    shapes = (W.LLAMA_1B, W.SO400M) if cuda else (W.TINY_LLAMA_GQA, W.TINY_SO400M)
    with tempfile.TemporaryDirectory() as tmp:
        model = W.build_random_model(Path(tmp), *shapes, device, dtype="bfloat16").eval()
    n = model.num_image_tokens
    lines = []
    cached = GenerationConfig()
    for b in (1, 8):
        batch = G.prompts(model, b, image=True)
        t = best(lambda batch=batch: G.generate(model, batch, cached, True))
        lines.append(
            f"image b{b}, KV cache: {t * 1e3:.1f} ms for {n} steps, {t / n * 1e3:.2f} ms/step"
        )
    lm = model.backbone.causal_lm
    lm.generation_config.eos_token_id = None  # both run to the token budget
    lm.generation_config.pad_token_id = model.sequence_builder.pad_id
    text = GenerationConfig(max_new_tokens=STEPS, ignore_eos=True)
    for b in (1, 8):
        batch = G.prompts(model, b, image=False)
        ids = torch.tensor([p.sample.input_ids for p in batch], device=device)

        def hf(ids: torch.Tensor = ids) -> object:
            with torch.no_grad():
                return lm.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=STEPS,
                    do_sample=False,
                )

        theirs = best(hf)
        ours = best(lambda batch=batch: G.generate(model, batch, text, False))
        lines.append(
            f"text b{b}: transformers generate {theirs / STEPS * 1e3:.2f} ms/step, "
            f"metamorph {ours / STEPS * 1e3:.2f} ms/step"
        )
    print("\n".join(lines))
    (out / "gen_times.txt").write_text("\n".join(lines) + "\n")

    batch = G.prompts(model, 8, image=True)
    G.generate(model, batch, cached, True)  # warm-up
    sync()
    activities = [ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda
    with profile(activities=activities) as prof:
        G.generate(model, batch, cached, True)
        sync()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=45)
    (out / "gen_profile.txt").write_text(table)
    print(f"wrote {out / 'gen_times.txt'} and {out / 'gen_profile.txt'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
