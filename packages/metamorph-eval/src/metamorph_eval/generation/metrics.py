"""The metrics of ``metamorph eval generation``, computed over the generated images on disk:

- ``fid``: the Fréchet distance in InceptionV3's pool3 space against the ``--reference``
  images (needs ``--inception-weights``);
- ``fd-encoder``: the same distance in a registered encoder's space (``--encoder NAME
  --encoder-kwargs JSON``; the mean of its tokens, see :mod:`.frechet`), e.g. a Fréchet SigLIP
  distance with no extra download;
- ``clip``: the CLIP score of each image with its prompt (``--clip DIR``), with its interval.

Reference statistics are cached in the run directory (``reference-<metric>.npz``, keyed by the
reference files' paths, sizes and times, the feature extractor and ``on_error``), so a rerun
does not embed the reference set again.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from metamorph_eval.generation.frechet import INCEPTION_REFUSAL, FeatureStats, stats_distance
from metamorph_eval.generation.images import folder_key, iter_image_batches, list_images

METRICS = ("fid", "fd-encoder", "clip")
FRECHET = ("fid", "fd-encoder")
_MAX_LISTED = 100  # unreadable reference files named in results.json


@dataclass(frozen=True)
class MetricOptions:
    """What the metrics need: ``inception_weights`` (a file) for ``fid``, ``encoder`` (a
    registered name) and ``encoder_kwargs`` for ``fd-encoder``, ``clip`` (a directory) for
    ``clip``; ``batch_size`` images are embedded at a time on ``device`` (``None``: the
    model's)."""

    inception_weights: str | None = None
    encoder: str | None = None
    encoder_kwargs: dict[str, Any] = field(default_factory=dict)
    clip: str | None = None
    batch_size: int = 32
    device: str | None = None

    def settings(self, names: Sequence[str]) -> dict[str, Any]:
        """The options the metrics ``names`` use, for results.json."""
        out: dict[str, Any] = {}
        if "fid" in names:
            out["inception_weights"] = self.inception_weights
        if "fd-encoder" in names:
            out["encoder"] = {"name": self.encoder, "kwargs": self.encoder_kwargs}
        if "clip" in names:
            out["clip"] = self.clip
        out["versions"] = _versions(_METRIC_PACKAGES)
        return out


_METRIC_PACKAGES = ("torch-fidelity", "scipy", "numpy", "pillow", "transformers")


def _versions(names: Sequence[str]) -> dict[str, str | None]:
    import importlib.metadata as md

    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def check_metrics(
    names: Sequence[str], reference: str | Path | None, options: MetricOptions
) -> list[Path] | None:
    """Check, before anything is generated, that ``names`` are known and have what they
    need; returns the reference images (``None`` when no Fréchet metric is asked)."""
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; choose from {', '.join(METRICS)}")
    if "fid" in names:
        if options.inception_weights is None:
            raise ValueError(INCEPTION_REFUSAL)
        if not Path(options.inception_weights).is_file():
            raise FileNotFoundError(
                f"--inception-weights '{options.inception_weights}': no such file"
            )
    if "fd-encoder" in names:
        if not options.encoder:
            raise ValueError(
                "metric fd-encoder needs --encoder NAME (a registered encoder, e.g. siglip) and "
                'usually --encoder-kwargs \'{"pretrained": "DIR"}\''
            )
        from metamorph_core.plugins.registry import get_registry

        get_registry().get("encoder", options.encoder)  # an unknown name raises, listing all
    if "clip" in names and not (Path(options.clip or "") / "config.json").is_file():
        raise FileNotFoundError(
            f"metric clip needs --clip DIR, a local CLIP or SigLIP checkpoint directory with a "
            f"config.json; got {options.clip!r}"
        )
    if not any(n in FRECHET for n in names):
        return None
    if reference is None:
        asked = [n for n in names if n in FRECHET]
        raise ValueError(f"metric(s) {asked} compare with real images: pass --reference DIR")
    return list_images(reference)


def compute_metrics(
    names: Sequence[str],
    generated: Sequence[Path],
    texts: Sequence[str],
    reference: Sequence[Path] | None,
    options: MetricOptions,
    *,
    cache_dir: Path,
    on_error: str = "raise",
    progress: bool = True,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(metrics, skipped)``: each metric of ``names`` over the ``generated`` image files
    (``texts[i]`` is image ``i``'s prompt); ``skipped`` counts (and names) the unreadable
    reference images left out with ``on_error="skip"``."""
    device = options.device or "cpu"
    results: dict[str, Any] = {}
    skipped: dict[str, Any] = {}
    frechet = [n for n in names if n in FRECHET]
    if frechet:
        assert reference is not None, "check_metrics returns the reference images"
        extractors = {n: _extractor(n, options, device) for n in frechet}
        ref_stats, bad = _reference_stats(
            reference, extractors, options.batch_size, on_error, cache_dir, progress
        )
        gen_stats, _ = _stats(
            generated, extractors, options.batch_size, "raise", progress, "generated"
        )
        for n in frechet:
            results[n] = {
                "value": stats_distance(gen_stats[n], ref_stats[n]),
                "n_generated": gen_stats[n].n,
                "n_reference": ref_stats[n].n,
                "features": extractors[n].identity,
            }
        if bad:
            skipped["reference_unreadable"] = len(bad)
            skipped["reference_unreadable_files"] = bad[:_MAX_LISTED]
    if "clip" in names:
        from metamorph_eval.generation.clip_score import ClipScorer
        from metamorph_eval.stats import mean

        scorer = ClipScorer(options.clip or "", device=device)
        values: list[float] = []
        bar = _bar(progress, len(generated), "CLIP score")
        for start in range(0, len(generated), options.batch_size):
            paths = generated[start : start + options.batch_size]
            (images,) = iter_image_batches(paths, len(paths))
            values += scorer.scores(images, texts[start : start + options.batch_size])
            _tick(bar, len(paths))
        _close(bar)
        results["clip"] = {**mean(values), "model": scorer.identity}
    return results, skipped


def _extractor(name: str, options: MetricOptions, device: str) -> Any:
    from metamorph_eval.generation.frechet import EncoderFeatures, InceptionFeatures

    if name == "fid":
        return InceptionFeatures(options.inception_weights, device=device)
    return EncoderFeatures(options.encoder or "", options.encoder_kwargs, device=device)


def _reference_stats(
    paths: Sequence[Path],
    extractors: dict[str, Any],
    batch_size: int,
    on_error: str,
    cache_dir: Path,
    progress: bool,
) -> tuple[dict[str, FeatureStats], list[str]]:
    files = folder_key(paths)
    keys = {
        n: json.dumps(
            {"files": files, "features": e.identity, "on_error": on_error}, sort_keys=True
        )
        for n, e in extractors.items()
    }
    cached: dict[str, FeatureStats] = {}
    bad: list[str] = []
    for n, key in keys.items():
        try:
            with np.load(cache_dir / f"reference-{n}.npz", allow_pickle=False) as data:
                if str(data["key"]) == key:
                    cached[n] = FeatureStats.from_state(data)
                    bad = [str(s) for s in data["skipped"]]
        except (OSError, ValueError, KeyError):
            continue
    todo = {n: e for n, e in extractors.items() if n not in cached}
    if todo:
        fresh, bad = _stats(paths, todo, batch_size, on_error, progress, "reference")
        cache_dir.mkdir(parents=True, exist_ok=True)
        for n, stats in fresh.items():
            target = cache_dir / f"reference-{n}.npz"
            tmp = target.with_name(f".{target.stem}.tmp.npz")
            np.savez(tmp, key=np.array(keys[n]), skipped=np.array(bad, dtype=str), **stats.state())
            tmp.replace(target)
        cached.update(fresh)
    return cached, bad


def _stats(
    paths: Sequence[Path],
    extractors: dict[str, Any],
    batch_size: int,
    on_error: str,
    progress: bool,
    what: str,
) -> tuple[dict[str, FeatureStats], list[str]]:
    """One pass over ``paths`` feeding every extractor; the files skipped."""
    stats = {n: FeatureStats() for n in extractors}
    bad: list[str] = []
    bar = _bar(progress, len(paths), f"{what} features")
    for batch in iter_image_batches(paths, batch_size, on_error, bad):
        for n, extract in extractors.items():
            stats[n].update(extract(batch))
        _tick(bar, len(batch))
    _close(bar)
    return stats, bad


def _bar(progress: bool, total: int, desc: str) -> Any:
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img")


def _tick(bar: Any, k: int) -> None:
    if bar is not None:
        bar.update(k)


def _close(bar: Any) -> None:
    if bar is not None:
        bar.close()
