"""Generating images for a prompt set and scoring them: :func:`evaluate_generation`.

The run directory ``OUT`` (see :mod:`metamorph_eval.runs`) holds::

    run.json                 the settings a rerun must match (model fingerprint, prompts,
                             images per prompt, seed, decoding, guidance) and package versions
    samples.jsonl            one line per finished prompt: index, id, prompt, image files,
                             the decoder seed of each image, seconds
    images/<index:05d>_<k:04d>.png
                             image k of the prompt at position index of the prompt file
    geneval/ or dpg/         the benchmark layout, with --layout (see :mod:`.writers`)
    reference-<metric>.npz   cached reference statistics (see :mod:`.metrics`)
    results.json             the metrics, the skipped counts and the recorded settings

Reproducible: the visual tokens are regressed deterministically from the prompt (the LLM's
classifier-free guidance ``visual_guidance_scale`` included), and image ``k`` of the prompt at
position ``p`` is decoded on its own with the decoder seed :func:`image_seed` ``(seed, p, k)``,
so a resumed run (or one with another batch size) draws the same images, up to the rounding
differences batching can make in the LLM. Resumable: a prompt is done when its line is in
``samples.jsonl`` and its images exist; a rerun generates only the others.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from metamorph_eval.generation.metrics import MetricOptions, check_metrics, compute_metrics
from metamorph_eval.generation.prompts import GenPrompt
from metamorph_eval.generation.writers import (
    DPG_IMAGES,
    dpg_path,
    geneval_folder,
    save_png,
    write_dpg,
    write_geneval,
)
from metamorph_eval.runs import RUN, SAMPLES, RunDir, versions

LAYOUTS = ("geneval", "dpg")
SEED_RULE = "sha256('{seed}/{index}/{k}') first 8 bytes, big-endian, >> 1"


def image_seed(seed: int, index: int, k: int) -> int:
    """The decoder seed of image ``k`` of the prompt at position ``index`` (a 63-bit integer;
    see :data:`SEED_RULE`): independent of batching and of which prompts ran before."""
    digest = hashlib.sha256(f"{seed}/{index}/{k}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def evaluate_generation(
    model: Any,
    prompts: Sequence[GenPrompt],
    out: str | Path,
    *,
    batch_size: int = 8,
    images_per_prompt: int = 1,
    seed: int = 0,
    decoding: Any = None,
    visual_guidance_scale: float = 1.0,
    reference: str | Path | None = None,
    metrics: Sequence[str] = (),
    metric_options: MetricOptions | None = None,
    layout: str | None = None,
    grid_resolution: int | None = None,
    on_error: str = "raise",
    model_id: dict[str, Any] | None = None,
    prompts_id: dict[str, Any] | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Generate ``images_per_prompt`` images for each of ``prompts`` with ``model`` (a
    :class:`~metamorph_core.MetaMorphModel` with a visual decoder), ``batch_size`` prompts per
    LLM batch, save them into ``out`` as they finish, write ``layout`` (``"geneval"``,
    ``"dpg"`` or ``None``; DPG needs 4 images per prompt and tiles them at ``grid_resolution``,
    default the images' size), then compute ``metrics`` (names of
    :data:`~.metrics.METRICS`) against the images of the folder ``reference``; returns the
    results, also written to ``out/results.json``.

    ``decoding``: the decoder's sampling, a dict of some
    :class:`~metamorph_core.decoding.DecodeConfig` fields over the decoder's own default
    (``{"steps": 50}``), a full ``DecodeConfig`` or ``None``; its seed is set per image, so a
    seed in it is an error. ``on_error``: an unreadable reference image raises, naming the
    file, or with ``"skip"`` is left out and counted. ``model_id`` / ``prompts_id``
    identify the checkpoint and the prompt file in ``run.json`` (the command passes the
    checkpoint's path, fingerprint and dtype, and the prompt file's path; the selected
    prompts' hash is added here). A rerun into ``out`` with other generation settings is
    refused with the differences (:class:`~metamorph_eval.runs.RunMismatchError`) once a
    prompt has finished; the metrics, the reference, the layout and the batch size may change
    between runs (they are recorded in results.json). The arguments, the metrics' inputs and
    the reference folder are checked before the first image is generated.
    """
    from metamorph_core.decoding import DecodeConfig
    from metamorph_core.generation import GenerationConfig

    options = metric_options or MetricOptions()
    if batch_size < 1 or images_per_prompt < 1:
        raise ValueError(
            f"batch_size and images_per_prompt must be >= 1, got {batch_size} and "
            f"{images_per_prompt}"
        )
    if layout not in (None, *LAYOUTS):
        raise ValueError(f"unknown layout {layout!r}; use one of {', '.join(LAYOUTS)}")
    if layout == "dpg":
        if images_per_prompt != DPG_IMAGES:
            raise ValueError(
                f"the DPG-Bench layout is a 2x2 grid: pass --images-per-prompt {DPG_IMAGES}, "
                f"not {images_per_prompt}"
            )
        for p in prompts:
            dpg_path(out, p.id)  # an id the scorer cannot read back raises now
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    recorded_decoding = _check_decoding(decoding, DecodeConfig)
    GenerationConfig(visual_guidance_scale=visual_guidance_scale)  # bad values raise now
    reference_images = check_metrics(metrics, reference, options)
    if not prompts:
        raise ValueError("no prompts to generate images for")
    if hasattr(model, "require_decoder"):
        model.require_decoder()

    _forget_empty_run(Path(out))
    run = RunDir(
        out,
        {
            "kind": "generation",
            "model": model_id or {},
            "prompts": {**(prompts_id or {}), "count": len(prompts), "sha256": _digest(prompts)},
            "generation": {
                "images_per_prompt": images_per_prompt,
                "seed": seed,
                "seed_rule": SEED_RULE,
                "visual_guidance_scale": visual_guidance_scale,
                "decoding": recorded_decoding,
            },
            "versions": versions(),
        },
    )
    root = run.path
    (root / "images").mkdir(exist_ok=True)
    done = _finished(run, {p.index for p in prompts})
    todo = [p for p in prompts if p.index not in done]
    began = time.perf_counter()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        total = len(prompts) * images_per_prompt
        left = len(todo) * images_per_prompt
        bar = tqdm(total=total, initial=total - left, unit="img", desc="generating")
    try:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            rows = _generate_batch(
                model, batch, root, images_per_prompt, seed, decoding, visual_guidance_scale, bar
            )
            for p, row in zip(batch, rows, strict=True):
                _write_layout(root, layout, p, row["images"], grid_resolution)
            run.append(rows)
            done.update({row["index"]: row for row in rows})
    finally:
        if bar is not None:
            bar.close()
    generated_seconds = time.perf_counter() - began
    for p in prompts:  # a layout asked for on a rerun, or cut short by a kill
        _write_layout(root, layout, p, done[p.index]["images"], grid_resolution, missing_only=True)

    files = [root / name for p in prompts for name in done[p.index]["images"]]
    texts = [p.text for p in prompts for _ in done[p.index]["images"]]
    device = options.device or _device_of(model)
    values, skipped = compute_metrics(
        metrics,
        files,
        texts,
        reference_images,
        dataclasses.replace(options, device=device),
        cache_dir=root,
        on_error=on_error,
        progress=progress,
    )
    results = {
        "metrics": values,
        "prompts": len(prompts),
        "images": len(files),
        "generated_now": len(todo),
        "skipped": skipped,
        "reference": None if reference is None else str(reference),
        "metric_settings": options.settings(metrics),
        "layout": None if layout is None else str(root / layout),
        "batch_size": batch_size,
        "seconds": {"generation": round(generated_seconds, 2)},
        "settings": run.run,
    }
    results["seconds"]["total"] = round(time.perf_counter() - began, 2)
    path = run.write_results(results)
    if log is not None:
        for name, value in values.items():
            ci = value.get("ci95")
            interval = f" (95% CI {ci[0]:.4f}-{ci[1]:.4f})" if ci else ""
            log(f"{name:<12} {value['value']:.4f}{interval}")
        if skipped:
            log(f"skipped: {skipped.get('reference_unreadable', 0)} unreadable reference images")
        log(f"results: {path}")
    return results


def _generate_batch(
    model: Any,
    batch: Sequence[GenPrompt],
    root: Path,
    images_per_prompt: int,
    seed: int,
    decoding: Any,
    visual_guidance_scale: float,
    bar: Any,
) -> list[dict[str, Any]]:
    """One LLM batch of visual tokens, then each image decoded on its own with its seed and
    saved; the rows for ``samples.jsonl``."""
    import torch

    from metamorph_core.decoding import DecodeConfig
    from metamorph_core.generation import to_pil

    t0 = time.perf_counter()
    with torch.no_grad():
        results = model.generate_image(
            [p.text for p in batch],
            visual_guidance_scale=visual_guidance_scale,
            decode_images=False,
        )
    rows = []
    for p, result in zip(batch, results, strict=True):
        if not result.images:
            raise RuntimeError(f"prompt {p.index} ({p.id!r}): the model generated no image")
        tokens = result.images[0]
        names, seeds = [], []
        for k in range(images_per_prompt):
            s = image_seed(seed, p.index, k)
            with torch.no_grad():
                if isinstance(decoding, DecodeConfig):
                    pixels = model.decode_images(tokens[None], DecodeConfig.of(decoding, seed=s))
                else:
                    pixels = model.decode_images(tokens[None], None, **(decoding or {}), seed=s)
            name = f"images/{p.index:05d}_{k:04d}.png"
            save_png(to_pil(pixels[0]), root / name)
            names.append(name)
            seeds.append(s)
            if bar is not None:
                bar.update(1)
        rows.append(
            {"index": p.index, "id": p.id, "prompt": p.text, "images": names, "seeds": seeds}
        )
    seconds = round((time.perf_counter() - t0) / max(len(rows), 1), 3)
    for row in rows:
        row["seconds"] = seconds
    return rows


def _write_layout(
    root: Path,
    layout: str | None,
    prompt: GenPrompt,
    images: Sequence[str],
    resolution: int | None,
    missing_only: bool = False,
) -> None:
    paths = [root / name for name in images]
    if layout == "geneval":
        folder = geneval_folder(root / "geneval", prompt.index)
        wanted = [folder / "metadata.jsonl"] + [
            folder / "samples" / f"{k:04d}.png" for k in range(len(paths))
        ]
        if not (missing_only and all(f.is_file() for f in wanted)):
            write_geneval(root / "geneval", prompt.index, prompt.meta, paths)
    elif layout == "dpg":
        target = dpg_path(root / "dpg", prompt.id)
        if not (missing_only and target.is_file()):
            write_dpg(root / "dpg", prompt.id, paths, resolution)


def _forget_empty_run(out: Path) -> None:
    """A run directory in which nothing finished (a first batch that failed) holds nothing to
    protect: its recorded settings are dropped, so a corrected rerun is not refused."""
    samples = out / SAMPLES
    if (out / RUN).is_file() and (not samples.is_file() or not samples.read_text().strip()):
        (out / RUN).unlink()


def _finished(run: RunDir, wanted: set[int]) -> dict[int, dict[str, Any]]:
    """The prompts whose line is in samples.jsonl and whose images all exist (the last line
    of a prompt counts)."""
    done: dict[int, dict[str, Any]] = {}
    for row in run.samples():
        index = row.get("index")
        if index in wanted and all((run.path / n).is_file() for n in row.get("images", [])):
            done[index] = row
        elif index in done:
            del done[index]
    return done


def _check_decoding(decoding: Any, config_type: type) -> dict[str, Any]:
    """``decoding`` as recorded in run.json; a seed in it is an error."""
    if decoding is None:
        return {"over_decoder_default": {}}
    if isinstance(decoding, config_type):
        fields = dataclasses.asdict(decoding)
        if fields.get("seed") is not None:
            raise ValueError(_SEED_SET)
        return {"config": {k: v for k, v in fields.items() if k != "seed"}}
    if isinstance(decoding, dict):
        if "seed" in decoding:
            raise ValueError(_SEED_SET)
        config_type.of(None, **decoding)  # unknown fields and bad values raise now
        return {"over_decoder_default": dict(sorted(decoding.items()))}
    raise TypeError(
        f"decoding must be a DecodeConfig, a dict of its fields or None, got {decoding!r}"
    )


_SEED_SET = (
    "the decoder seed is set per image from --seed (see image_seed); leave 'seed' out of decoding"
)


def _digest(prompts: Sequence[GenPrompt]) -> str:
    digest = hashlib.sha256()
    for p in prompts:
        digest.update(json.dumps([p.index, p.id, p.text], ensure_ascii=False).encode() + b"\n")
    return digest.hexdigest()


def _device_of(model: Any) -> str:
    try:
        return str(next(model.parameters()).device)
    except (AttributeError, StopIteration):
        return "cpu"
