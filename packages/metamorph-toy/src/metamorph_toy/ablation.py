"""`metamorph demo --ablation`: the paper's findings on the toy world over seeds, each
condition a demo run (:func:`~metamorph_toy.demo.run_demo`) that shares with the seed's
first condition the stages its data leaves unchanged."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from metamorph_toy.demo import remove_demo_run, run_demo, settings_differ
from metamorph_toy.presets import PRESETS, Options, Preset, recorded_settings, run_record
from metamorph_toy.stages import VPIT_WEIGHTS
from metamorph_toy.stats import t_interval

ABLATIONS = {
    # condition -> options; generation data is cut to a tenth (the low-data regime)
    "all_data": {},
    "no_understanding": {"understanding_data": False},
    "no_text_facts": {"text_facts": False},
}


def run_ablation(
    preset: str = "quick",
    out: str | Path = "runs/demo-ablation",
    seeds: tuple[int, ...] = (0, 1, 2),
    log: Callable[[str], None] = print,
    lanes: int = 1,
    reuse: str | None = None,
) -> dict[str, Any]:
    """The paper's findings on the toy world, over ``seeds``: generation accuracy with and
    without understanding data at equal (low) generation data, and reasoning accuracy with and
    without the text-only facts (removed from language-model pretraining and from VPiT). Each
    condition is a run in ``out/seed-N/CONDITION``; the first condition of a seed trains every
    stage and the others copy its judge, encoder and decoder (and its language model where their
    text is the same): their data is the same, checked file by file. Every condition sees the
    same number of generation conversations in VPiT (:func:`ablation_vpit_steps`): one without
    a source trains fewer steps, so that it differs from the first only by that source's
    batches. A condition whose run finished earlier is read back, not rerun, so an interrupted
    ablation resumes; an unfinished one is removed and run again. ``lanes`` as in
    :func:`~metamorph_toy.demo.run_demo`.

    ``reuse``: each seed's finished demo run of the same preset, ``{seed}`` in the path standing
    for the seed (``"runs/demo-s{seed}"``): the seed's first condition copies from it the
    judge, encoder and decoder, and the language model where its text is the same
    (:func:`~metamorph_toy.demo.run_demo`'s ``reuse``, which checks the data file by file), so
    that an ablation after the seeds' demo runs trains little more than VPiT. Every seed's run
    is checked to exist and to be of that seed before anything trains."""
    earlier = _reused_runs(reuse, seeds)
    base = PRESETS[preset]
    low = max(base.generation // 10, 16)
    results: dict[str, dict[str, list[float]]] = {}
    copied: dict[str, list[Any]] = {}  # each run's stages copied from another, per seed
    steps = {c: ablation_vpit_steps(base.vpit_steps, s) for c, s in ABLATIONS.items()}
    for seed in seeds:
        first: Path | None = None
        for condition, switches in ABLATIONS.items():
            options = Options(seed=seed, generation=low, vpit_steps=steps[condition], **switches)
            run_dir = Path(out) / f"seed-{seed}" / condition
            m = _finished_run(run_dir, base, options, log)
            if m is None:
                m = run_demo(
                    preset, run_dir, options, log, reuse=first or earlier.get(seed), lanes=lanes
                )
            first = first or run_dir
            copied.setdefault(condition, []).append(m.get("reused"))
            row = results.setdefault(condition, {k: [] for k in _ABLATION_METRICS})
            for key, metric in _ABLATION_METRICS.items():
                row[key].append(m[metric]["value"])
    summary = {
        "preset": preset,
        "seeds": list(seeds),
        "generation_conversations": low,
        "reused": copied,
        "vpit_steps": steps,
        "conditions": {
            c: {
                k: {"mean": float(np.mean(v)), "std": float(np.std(v)), "runs": v}
                for k, v in row.items()
            }
            for c, row in results.items()
        },
    }
    if len(seeds) > 1:
        summary["findings"] = _findings(results)
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "ablation.json").write_text(json.dumps(summary, indent=2))
    log(f"[demo] ablation summary: {Path(out) / 'ablation.json'}")
    return summary


def _findings(results: dict[str, dict[str, list[float]]]) -> dict[str, Any]:
    """The paper's findings as numbers over the seeds, each with its 95 % t-interval (seeds as
    samples; differences paired by seed): generation from a tenth of the data with every
    source; what understanding data adds to it; what the text-only facts add to reasoning."""

    def stat(values: list[float]) -> dict[str, Any]:
        low, high = t_interval(values)
        return {"mean": float(np.mean(values)), "ci95": [low, high], "runs": values}

    def minus(a: str, b: str, key: str) -> list[float]:
        return [x - y for x, y in zip(results[a][key], results[b][key], strict=True)]

    return {
        "generation_with_little_data": stat(results["all_data"]["generation"]),
        "understanding_data_on_generation": stat(
            minus("all_data", "no_understanding", "generation")
        ),
        "text_facts_on_reasoning": stat(minus("all_data", "no_text_facts", "reasoning")),
    }


def _reused_runs(reuse: str | None, seeds: tuple[int, ...]) -> dict[int, Path]:
    """Each seed's finished demo run named by ``reuse`` (``{seed}`` for the seed); a clear
    error, before anything trains, for a pattern that names one run for several seeds or a
    run that is missing, unfinished or of another seed."""
    if reuse is None:
        return {}
    if "{seed}" not in reuse and len(seeds) > 1:
        raise ValueError(
            f"reuse '{reuse}' names one run for {len(seeds)} seeds; put {{seed}} where each "
            "seed's run differs (e.g. runs/demo-s{seed})"
        )
    runs = {seed: Path(reuse.replace("{seed}", str(seed))) for seed in seeds}
    for seed, run in runs.items():
        record = run / "metrics.json"
        if not record.is_file():
            raise FileNotFoundError(
                f"reuse: '{run}' holds no finished demo run (no metrics.json) for seed {seed}"
            )
        ran = json.loads(record.read_text()).get("run", {}).get("seed")
        if ran != seed:
            raise ValueError(f"reuse: '{run}' is a run of seed {ran}, not seed {seed}")
    return runs


def ablation_vpit_steps(steps: int, switches: dict[str, bool]) -> int:
    """VPiT steps for an ablation condition: ``steps`` scaled so that the expected number of
    generation conversations drawn (``VPIT_WEIGHTS``' share of generation, times steps) is that
    of a run with every source. Without understanding data (0.6 of the steps, e.g. 1800 ->
    1080) the text conversations drawn stay equal too; the run is the full one less its
    understanding batches. At equal steps a run without a source would see more generation
    instead."""
    present = {
        "understanding": switches.get("understanding_data", True),
        "generation": True,
        "text": switches.get("text_facts", True),
    }
    share = VPIT_WEIGHTS["generation"] / sum(w for n, w in VPIT_WEIGHTS.items() if present[n])
    return round(steps * (VPIT_WEIGHTS["generation"] / sum(VPIT_WEIGHTS.values())) / share)


_ABLATION_METRICS = {  # summary key -> metrics.json entry
    "generation": "generation_accuracy",
    "reasoning": "reasoning_generation_accuracy",
    # the generated tokens' nearest scene: generation without the decoder's drawing in the way
    "tokens": "token_nearest_neighbour_accuracy",
    "understanding": "understanding_accuracy",
}


def _finished_run(
    run_dir: Path, preset: Preset, options: Options, log: Callable[[str], None]
) -> dict[str, Any] | None:
    """The metrics of a run finished earlier in ``run_dir`` with these settings; None (after
    removing what an interrupted run left there) when there is none."""
    record = run_dir / "metrics.json"
    if not record.is_file():
        if run_dir.exists():
            log(f"[demo] {run_dir}: an unfinished run, removed and run again")
            remove_demo_run(run_dir)
        return None
    metrics = json.loads(record.read_text())
    differ = settings_differ(recorded_settings(metrics["run"]), run_record(preset, options))
    if differ:
        raise FileExistsError(
            f"'{run_dir}' holds a run with other settings ({', '.join(differ[:5])}); "
            "pick a new --out for this ablation"
        )
    log(f"[demo] {run_dir}: finished earlier, its metrics read back")
    return metrics


__all__ = ["ABLATIONS", "ablation_vpit_steps", "run_ablation"]
