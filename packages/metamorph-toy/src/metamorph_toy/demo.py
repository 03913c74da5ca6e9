"""`metamorph demo`: the whole method on the toy world, offline, on a CPU, measured.

Stages, each through the library's Python API (the recipe runner, the feature-cache builders,
``MetaMorphModel``: the code paths real checkpoints use); each stage's recipe is also written to
``OUT/recipes`` so that ``metamorph train OUT/recipes/STAGE.yaml`` reruns it by hand:

1. ``world``: render the data (``OUT/data``): image-caption pairs, text, VPiT conversations
   (:mod:`metamorph_toy.run_files`).
2. ``judge``: train and validate the independent judge (pixels -> attributes).
3. ``encoder``: objective ``siglip``: a small SigLIP pretrained on the captions.
4. ``center`` and ``cache``: the encoder's mean token (encoder option ``center``), then
   the feature cache of that encoder over every image.
5. ``decoder``: objective ``decoder`` on the cached tokens (pixel-space diffusion UNet).
6. ``lm``: objective ``causal-lm`` on the world's text, with a tokenizer trained on it.
7. ``vpit``: objective ``vpit``, policy ``full``: understanding, generation and text-only conversations.
   (Then, in presets with ``decoder_tune_steps``, not in the paper: ``predict``, the tokens
   the LLM generates for its generation prompts, ``metamorph cache-features --predicted-by``;
   and ``tune``, recipe ``decoder`` from the trained decoder on those tokens, ``OUT/
   decoder-tuned``, the decoder that draws the generated images.)
8. ``eval``: metrics with 95% intervals and chance baselines (``metrics.json``) and a
   ``report.md`` with PNG grids.

With two lanes (``metamorph demo``; ``run_demo(lanes=2)``) stages 3-5 run in a second
process beside 2, 6 and 7; VPiT waits for the cache (:func:`_two_lanes`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from metamorph_toy import world as W
from metamorph_toy.evaluate import evaluate, write_report
from metamorph_toy.presets import (
    PRESETS,
    Options,
    Preset,
    recorded_settings,
    run_record,
    wall_budget,
)
from metamorph_toy.run_files import write_world
from metamorph_toy.stages import (
    VPIT_WEIGHTS,
    cache_features,
    center_encoder,
    hide_progress,
    predict_tokens,
    train_decoder,
    train_encoder,
    train_lm,
    train_vpit,
    tune_decoder,
)


@dataclass
class StageClock:
    seconds: dict[str, float] = field(default_factory=dict)

    def run(self, name: str, fn: Callable[[], Any], log: Callable[[str], None]) -> Any:
        log(f"[demo] {name} ...")
        began = time.perf_counter()
        out = fn()
        self.seconds[name] = round(time.perf_counter() - began, 2)
        log(f"[demo] {name} done in {self.seconds[name]:.1f} s")
        return out


# -- the run -----------------------------------------------------------------------------------
#: a stage: its name, a module-level function and its arguments (picklable: a lane may run it
#: in another process)
Stage = tuple[str, Callable[..., Any], tuple[Any, ...]]


def _copy_stage(source: Path, out: Path, entry: str) -> None:
    """A stage of an earlier run copied instead of trained (``run_demo(reuse=)``)."""
    import shutil

    shutil.copytree(source / entry, out / entry)


def _exit_with(parent: int) -> None:
    """End this process when process ``parent`` is gone: a demo killed without the chance to
    stop its lane (``kill``, not Ctrl-C, which reaches both) leaves no lane training on."""
    import os
    import threading

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-demo", daemon=True).start()


def _lane(stages: list[Stage], threads: int, parent: int | None = None) -> dict[str, float]:
    """Run ``stages`` one after another in this process on ``threads`` torch threads, without
    progress bars (another lane owns the terminal's); returns their seconds. ``parent``: the
    demo's process id, whose end ends this process too."""
    import torch

    if parent is not None:
        _exit_with(parent)
    hide_progress()
    torch.set_num_threads(threads)
    clock = StageClock()
    for name, fn, args in stages:
        clock.run(name, lambda fn=fn, args=args: fn(*args), lambda m: print(m, flush=True))
    return clock.seconds


def _two_lanes(
    clock: StageClock,
    log: Callable[[str], None],
    make_judge: Callable[[], Any],
    encoder_side: list[Stage],
    decoder: Stage,
    lm: Stage,
    vpit: Stage,
    threads: int,
) -> Any:
    """The stages in two lanes, each on half of ``threads``: a spawned process trains the
    encoder, builds its feature cache and trains the decoder; this one trains the judge and
    the language model, waits for the cache, then trains VPiT beside the decoder. Small models
    use two threads poorly (measured on 2 cores: VPiT 5.2 steps/s alone on both, 3.65 each
    for two runs side by side on one each), so two lanes finish sooner than one. Returns the
    judge; each stage's seconds go into ``clock`` (they overlap: ``total`` is the wall)."""
    import multiprocessing
    import os
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    import torch

    half = max(threads // 2, 1)
    log(f"[demo] two lanes of {half} thread(s): encoder, cache, decoder | judge, lm, vpit")
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        cache = pool.submit(_lane, encoder_side, half, os.getpid())
        drawn = pool.submit(_lane, [decoder], half)  # after the cache, in the same process
        torch.set_num_threads(half)
        try:
            judge = clock.run("judge", make_judge, log)
            clock.run(lm[0], lambda: lm[1](*lm[2]), log)
            clock.seconds.update(cache.result())
            clock.run(vpit[0], lambda: vpit[1](*vpit[2]), log)
            clock.seconds.update(drawn.result())
        except BrokenProcessPool as e:
            raise RuntimeError(
                "the demo's second lane (encoder, cache, decoder) died before it finished; "
                "its error is printed above. If run_demo(lanes=2) was called from a script, "
                'call it under `if __name__ == "__main__":` (the lane\'s process imports the '
                "script's main module), or use lanes=1"
            ) from e
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        finally:
            torch.set_num_threads(threads)
    return judge


_RUN_ENTRIES = {
    "data", "judge", "encoder", "cache", "decoder", "lm", "vpit", "recipes", "metrics.json",
    "report.md", "generation.png", "reasoning.png", "understanding.png", "cache-predicted",
    "decoder-tuned", "eval",
}  # fmt: skip


def remove_demo_run(out: str | Path) -> None:
    """Delete an earlier demo run in ``out`` (``metamorph demo --overwrite``, ``make demo``).
    Refuses a directory holding anything a demo run does not write, so nothing else is lost."""
    import shutil

    out = Path(out)
    if not out.exists():
        return
    if not out.is_dir():
        raise FileExistsError(f"'{out}' is a file, not a demo run; pick another --out")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in _RUN_ENTRIES)
    if foreign:
        raise FileExistsError(
            f"'{out}' holds {foreign[:5]}, which a demo run does not write; "
            "move them away or pick another --out"
        )
    shutil.rmtree(out)


def _same_bytes(a: Path, b: Path) -> bool:
    return a.is_file() and b.is_file() and a.read_bytes() == b.read_bytes()


def settings_differ(run: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """The keys of ``wanted`` whose values a run's recorded settings (``metrics.json`` "run")
    do not hold, compared as JSON stores them (tuples as lists)."""
    wanted = json.loads(json.dumps(wanted))
    return sorted(k for k, v in wanted.items() if run.get(k) != v)


def reusable_stages(out: Path, earlier: Path, preset: Preset, options: Options) -> set[str]:
    """The stages of ``earlier``, a finished demo run, that a run into ``out`` (whose world is
    written) may copy: ``judge`` (a function of the seed and preset), ``encoder`` (with its
    token mean) and ``decoder`` when the image-caption pairs and decoder images are the same
    file for file, and ``lm`` when the language model's text is the same. Raises when
    ``earlier`` is not a finished run of the same preset and seed, or its images differ."""
    record = earlier / "metrics.json"
    if not record.is_file():
        raise FileNotFoundError(f"'{earlier}' holds no finished demo run (no metrics.json)")
    run = json.loads(record.read_text())["run"]
    # the preset's fields (less those the options override, as the ablation's generation
    # count) and the seed: what the copied stages and their data depend on
    fixed = {k: v for k, v in asdict(preset).items() if k not in asdict(options)}
    differ = settings_differ(recorded_settings(run), {**fixed, "seed": options.seed})
    if differ:
        raise ValueError(
            f"'{earlier}' is a run with other settings ({', '.join(differ[:5])}); reuse needs "
            "one of the same preset and seed"
        )
    for name in ("pairs", "decoder"):
        rows = [json.loads(x) for x in (out / "data" / f"{name}.jsonl").read_text().splitlines()]
        images = dict.fromkeys(Path("data/images") / r["image"] for r in rows)  # each once
        files = [Path("data") / f"{name}.jsonl", *images]
        changed = next((f for f in files if not _same_bytes(out / f, earlier / f)), None)
        if changed is not None:
            raise ValueError(
                f"'{earlier / changed}' differs from this run's '{out / changed}': the encoder "
                "and decoder of that run were trained on other data and cannot be reused"
            )
    stages = {"judge", "encoder", "decoder"}
    if _same_bytes(out / "data" / "lm_text.jsonl", earlier / "data" / "lm_text.jsonl"):
        stages.add("lm")
    return stages


def run_demo(
    preset: str | Preset = "quick",
    out: str | Path = "runs/demo",
    options: Options | None = None,
    log: Callable[[str], None] = print,
    reuse: str | Path | None = None,
    lanes: int = 1,
) -> dict[str, Any]:
    """Run every stage into ``out``; returns the metrics (also in ``out/metrics.json``).

    ``lanes`` 1: one stage after another on all CPU threads. 2 (``metamorph demo``'s default;
    with two threads or more): the encoder, its feature cache and the decoder train in a
    spawned process beside the judge, the language model and VPiT, each lane on half the
    threads (:func:`_two_lanes`). As with any spawned process, a script that calls this with
    ``lanes=2`` must do so under ``if __name__ == "__main__":`` (the new process imports the
    script's main module, and would otherwise run it again).

    ``reuse``: a finished run of the same preset and seed (the ablation's first condition)
    whose judge, encoder and decoder, and language model where this run's text for it is the
    same, are copied instead of trained. They depend only on data both runs render alike, which
    is checked file by file before anything is copied (:func:`reusable_stages`)."""
    import torch

    from metamorph_toy.judge import Judge, train_judge, validate_judge

    if lanes not in (1, 2):
        raise ValueError(f"lanes={lanes!r}: use 2 (two processes side by side) or 1")
    name = preset if isinstance(preset, str) else "custom"
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ValueError(f"unknown demo preset '{preset}'; use one of {sorted(PRESETS)}")
        preset = PRESETS[preset]
    options = options or Options()
    out = Path(out)
    if (out / "metrics.json").exists() or (out / "vpit").exists():
        raise FileExistsError(
            f"'{out}' holds an earlier demo run; pick a new --out directory or remove it"
        )
    (out / "recipes").mkdir(parents=True, exist_ok=True)
    torch.manual_seed(options.seed)
    clock = StageClock()
    started = time.perf_counter()
    world = clock.run("world", lambda: write_world(out, preset, options), log)
    files = {**world["files"], "images": world["images"]}
    judge_dir = out / "judge"
    source = Path(reuse) if reuse is not None else None
    reused = reusable_stages(out, source, preset, options) if source is not None else set()

    def copied(entry: str) -> Stage:
        return (entry, _copy_stage, (source, out, entry))

    def make_judge() -> Any:
        if "judge" in reused:
            _copy_stage(source, out, "judge")  # type: ignore[arg-type]
        else:
            train_judge(seed=options.seed, steps=preset.judge_steps).save(judge_dir)
        return Judge.load(judge_dir)

    seed = options.seed
    # the stages between the world and VPiT as (name, function, arguments); reused ones are
    # copied from the earlier run instead
    encoder_side: list[Stage] = []  # encoder, its token mean, the feature cache
    if "encoder" in reused:  # the trained encoder and its token mean (stage ``center``)
        encoder_side.append(copied("encoder"))
    else:
        encoder_side.append(("encoder", train_encoder, (out, preset, files, seed)))
        encoder_side.append(("center", center_encoder, (out, preset, files)))
    encoder_side.append(("cache", cache_features, (out, preset, files)))
    decoder: Stage = (
        copied("decoder")
        if "decoder" in reused
        else ("decoder", train_decoder, (out, preset, files, seed))
    )
    lm: Stage = copied("lm") if "lm" in reused else ("lm", train_lm, (out, preset, files, seed))
    steps = options.vpit_steps or preset.vpit_steps
    vpit: Stage = ("vpit", train_vpit, (out, preset, files, seed, steps))
    threads = torch.get_num_threads()
    if lanes == 2 and threads < 2:
        log("[demo] one CPU thread: the stages run one after another")
        lanes = 1
    if lanes == 1:
        judge = clock.run("judge", make_judge, log)
        for name, fn, args in [*encoder_side, decoder, lm, vpit]:
            clock.run(name, lambda fn=fn, args=args: fn(*args), log)
    else:
        judge = _two_lanes(clock, log, make_judge, encoder_side, decoder, lm, vpit, threads)
    validation = validate_judge(judge, seed=options.seed + 1)
    if preset.decoder_tune_steps:
        clock.run("predict", lambda: predict_tokens(out, files), log)
        clock.run("tune", lambda: tune_decoder(out, preset, files, seed), log)
    metrics, report = clock.run(
        "eval", lambda: evaluate(out, preset, options, world["splits"], judge, log), log
    )
    clean = validation["clean"]["accuracy"]  # all four attributes right, fresh renders
    metrics["judge_accuracy"] = {
        "value": clean["rate"],
        "ci95": list(clean["ci95"]),
        "n": clean["n"],
        "chance": 1 / len(W.all_scenes()),
    }
    metrics["judge_validation"] = validation
    # each stage's own seconds (with two lanes, stages of both lanes overlap) and the wall
    metrics["seconds"] = {**clock.seconds, "total": round(time.perf_counter() - started, 2)}
    if preset.stage_budget_s:
        budget = preset.stage_budget_s
        metrics["seconds_budget"] = {**budget, "total": wall_budget(budget, lanes)}
        metrics["over_budget"] = [k for k, v in clock.seconds.items() if v > budget.get(k, 0.0)]
        for k in metrics["over_budget"]:
            log(
                f"[demo] stage {k} took {clock.seconds[k]:.0f} s, over its budget of "
                f"{budget.get(k, 0.0):.0f} s (the preset was sized on a 2-core CPU)"
            )
    metrics["run"] = {"preset": name, **run_record(preset, options)}
    metrics["lanes"] = lanes
    if reused:
        metrics["reused"] = {"from": str(reuse), "stages": sorted(reused)}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    write_report(out, metrics, report)
    log(f"[demo] report: {out / 'report.md'}  metrics: {out / 'metrics.json'}")
    return metrics


__all__ = [
    "VPIT_WEIGHTS",
    "PRESETS",
    "Options",
    "Preset",
    "remove_demo_run",
    "reusable_stages",
    "settings_differ",
    "run_demo",
]
