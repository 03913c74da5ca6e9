"""What the lmms-eval model makes of lmms-eval's requests, without lmms-eval itself: the
prompt layout, the visuals a task hands over, generation settings from a task's
``generation_kwargs``, and the order requests are batched in."""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

from metamorph_eval.tasks import with_images

logger = logging.getLogger("metamorph")

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def prompt_text(context: str, num_images: int, where: str = "") -> str:
    """The user turn for ``context`` with ``num_images`` images: each image where an
    ``<image>`` stands in the text or, when the text has none, all of them before it with one
    newline after (the layout of ``metamorph eval understanding``, so both ask the same
    thing). ``where`` names the request in errors."""
    try:
        return with_images(context, [""] * num_images)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from e


def as_images(visuals: Any, where: str = "") -> list[Any]:
    """A task's ``doc_to_visual`` output -> the images of one prompt, in order. ``None`` and
    ``[]`` are text-only; PIL images, arrays, tensors and image file paths are kept (the
    encoder reads them); videos and audio are refused, naming ``where``."""
    if visuals is None:
        return []
    items = list(visuals) if isinstance(visuals, (list, tuple)) else [visuals]
    out = []
    for i, item in enumerate(items):
        if isinstance(item, (list, tuple)):  # some tasks nest one list per image group
            out += as_images(item, where)
        elif isinstance(item, (str, Path)):
            if not str(item).lower().endswith(_IMAGE_SUFFIXES):
                raise ValueError(
                    f"{where}: visual {i} is the path '{item}', which is not an image file "
                    f"({', '.join(_IMAGE_SUFFIXES)}); the metamorph model reads images only, "
                    "not videos: pick an image task or give frames as images"
                )
            out.append(item)
        elif isinstance(item, dict):
            raise ValueError(
                f"{where}: visual {i} is a dict (lmms-eval's audio format, keys "
                f"{sorted(item)}); the metamorph model reads images only"
            )
        else:
            out.append(item)
    return out


def generation_options(
    gen_kwargs: Mapping[str, Any] | None, max_new_tokens: int, seed: int | None = None
) -> dict[str, Any]:
    """:class:`~metamorph_core.generation.GenerationConfig` fields from a task's
    ``generation_kwargs``: ``max_new_tokens`` (else the model's default ``max_new_tokens``),
    ``until`` -> ``stop`` (empty strings dropped), and the decoding: sampling when
    ``do_sample`` is true (at ``temperature``, default 1) or, without ``do_sample``, when
    ``temperature`` > 0; greedy otherwise, and always at ``temperature`` 0 (lmms-eval tasks
    write ``temperature: 0`` for greedy). ``temperature``, ``top_p`` and ``top_k`` are passed
    only when sampling (a ``top_p`` of 0 or ``None`` means no cut), as our
    ``GenerationConfig`` refuses them with greedy decoding; ``seed`` seeds sampling.
    ``num_beams`` > 1 raises (no beam search); other keys are ignored."""
    kw = dict(gen_kwargs or {})
    until = kw.pop("until", None)
    if until is None:
        stop: tuple[str, ...] = ()
    elif isinstance(until, str):
        stop = (until,) if until else ()
    elif isinstance(until, (list, tuple)) and all(isinstance(s, str) for s in until):
        stop = tuple(dict.fromkeys(s for s in until if s))
    else:
        raise ValueError(
            f"generation_kwargs 'until' must be a string or a list of strings, got {until!r}"
        )
    budget = kw.pop("max_new_tokens", None) or max_new_tokens
    if not isinstance(budget, int) or budget < 1:
        raise ValueError(
            f"generation_kwargs 'max_new_tokens' must be an integer >= 1, got {budget!r}"
        )
    beams = kw.pop("num_beams", 1) or 1
    if beams != 1:
        raise ValueError(
            f"generation_kwargs asks for num_beams={beams}, but the metamorph model has no beam "
            "search; run with --gen_kwargs num_beams=1 (greedy) or do_sample=True"
        )
    temperature = kw.pop("temperature", None)
    temperature = None if temperature is None else float(temperature)
    if "do_sample" in kw:
        do_sample = bool(kw.pop("do_sample")) and (temperature is None or temperature > 0)
    else:
        do_sample = temperature is not None and temperature > 0
    top_p = kw.pop("top_p", None)
    top_k = kw.pop("top_k", None)
    options: dict[str, Any] = {"max_new_tokens": int(budget), "stop": stop, "do_sample": do_sample}
    if do_sample:
        options["temperature"] = 1.0 if temperature is None else temperature
        if top_p not in (None, 0, 0.0):
            options["top_p"] = float(top_p)
        if top_k:
            options["top_k"] = int(top_k)
        options["seed"] = seed
    if kw:
        logger.debug("generation_kwargs ignored by the metamorph model: %s", sorted(kw))
    return options


def options_key(options: Mapping[str, Any]) -> Hashable:
    """A hashable key of generation options: requests batch together only under equal keys."""
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in options.items()))


def plan_batches(lengths: Sequence[int], keys: Sequence[Hashable], size: int) -> list[list[int]]:
    """Request indices in batches of at most ``size``: requests grouped by ``keys`` (groups
    in order of first appearance), longest first within a group (ties keep their order), so
    padding is small and an out-of-memory error comes at the start. Callers put each result
    back at its request's index."""
    if size < 1:
        raise ValueError(f"batch size must be >= 1, got {size}")
    groups: dict[Hashable, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    out = []
    for members in groups.values():
        ordered = sorted(members, key=lambda i: -lengths[i])
        out += [ordered[s : s + size] for s in range(0, len(ordered), size)]
    return out


def parse_batch_size(value: Any, default: int = 8) -> int:
    """lmms-eval's ``--batch_size``: ``N`` (an int or a numeric string), or ``auto`` /
    ``auto:N``, which the metamorph model does not probe for: ``auto`` is ``default``."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    text = str(value).strip().lower()
    if text.isdigit() and int(text) >= 1:
        return int(text)
    if text == "auto" or text.startswith("auto:"):
        logger.warning("batch_size=%s: the metamorph model uses batches of %d", value, default)
        return default
    raise ValueError(f"batch_size must be an integer >= 1 or 'auto', got {value!r}")
