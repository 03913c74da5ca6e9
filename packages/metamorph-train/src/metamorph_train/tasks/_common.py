"""What the task builders share: the record shape, input checks whose errors name the task, the
example and the fix, seeded randomness, and reading and writing the images some builders draw.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import re
from pathlib import Path
from typing import Any

TAG = "<image>"
Example = dict[str, Any]
Record = dict[str, Any]
PathLike = str | os.PathLike[str]


def record(example: Example, task: str, images: list[str], human: str, gpt: str) -> Record:
    """A LLaVA record ``{"id", "image", "conversations": [human, gpt]}``; ``images`` must be in
    the order of the ``<image>`` tags of ``human`` then ``gpt``. Raises when the counts differ
    (a text taken from the data held tags of its own)."""
    n_tags = human.count(TAG) + gpt.count(TAG)
    if n_tags != len(images):
        raise bad(
            example,
            task,
            f"the conversation holds {n_tags} '{TAG}' tags for {len(images)} "
            f"images; the example's texts may hold no '{TAG}' but where the task says so",
        )
    return {
        "id": example.get("id"),
        "image": images,
        "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}],
    }


def need(example: Example, task: str, *keys: str) -> None:
    """Raise ``KeyError`` naming the task, the example id and the missing keys."""
    missing = [k for k in keys if k not in example]
    if missing:
        raise KeyError(f"task '{task}': example {example.get('id')!r} lacks {missing}")


def bad(example: Example, task: str, problem: str) -> ValueError:
    """A ``ValueError`` naming the task and the example id; ``problem`` says what and the fix."""
    return ValueError(f"task '{task}': example {example.get('id')!r}: {problem}")


def rng_for(example: Example, rng: random.Random | None) -> random.Random:
    """``rng`` if given, else ``random.Random(str(example["id"]))``: the same example always
    draws the same choices (a ``str`` seed is hashed with SHA-512, so it does not depend on
    ``PYTHONHASHSEED``). Pass your own ``rng`` for fresh draws, e.g. one per epoch."""
    return rng if rng is not None else random.Random(str(example.get("id")))


def text_field(example: Example, task: str, key: str) -> str:
    need(example, task, key)
    value = example[key]
    if not isinstance(value, str):
        raise bad(example, task, f"'{key}' must be a string, got {type(value).__name__}")
    return value


def frame_list(example: Example, task: str, minimum: int = 2) -> list[str]:
    """``example["frames"]``: at least ``minimum`` paths, in time order."""
    need(example, task, "frames")
    frames = example["frames"]
    if not isinstance(frames, list | tuple) or not all(isinstance(f, str) and f for f in frames):
        raise bad(example, task, "'frames' must be a list of frame image paths in time order")
    if len(frames) < minimum:
        raise bad(
            example,
            task,
            f"needs at least {minimum} frames, got {len(frames)}; drop the example "
            "or sample its video more densely",
        )
    return list(frames)


def seconds(example: Example, task: str) -> str:
    """``example["interval"]`` (seconds between consecutive frames, > 0) as the prompts write
    it: the float rounded to milliseconds, as Python prints it (``2`` -> ``"2.0"``, ``0.5`` ->
    ``"0.5"``), which is what the research code's rounded float interval prints as."""
    need(example, task, "interval")
    t = example["interval"]
    if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t) or t <= 0:
        raise bad(
            example,
            task,
            f"'interval' must be the seconds between consecutive frames, a "
            f"positive number; got {t!r}",
        )
    return str(round(float(t), 3))


def question_with_tag(example: Example, task: str, question: str) -> str:
    """The question with exactly one ``<image>`` (the original image's): kept where it is, or
    put first as ``"<image>\\n"`` (LLaVA's layout) when the question has none."""
    n = question.count(TAG)
    if n == 0:
        return f"{TAG}\n{question}"
    if n > 1:
        raise bad(
            example, task, f"the question holds {n} '{TAG}' tags; it may hold one, the image's"
        )
    return question


# ----------------------------------------------------------------------------- image files


def input_path(example: Example, task: str, key: str, image_root: PathLike | None) -> Path:
    """The file of ``example[key]``: under ``image_root`` when given, else as written."""
    name = text_field(example, task, key)
    path = Path(image_root) / name if image_root is not None else Path(name)
    if not path.is_file():
        raise bad(
            example,
            task,
            f"image '{name}' not found at '{path}'; pass image_root= the folder "
            "the example's paths are relative to",
        )
    return path


def open_rgb(example: Example, task: str, path: Path) -> Any:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError) as e:
        raise bad(example, task, f"cannot read image '{path}': {e}") from e


def _file_stem(example_id: Any) -> str:
    text = str(example_id)
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._")[:80] or "example"
    if safe != text:  # keep distinct ids distinct after cleaning
        safe += "-" + hashlib.sha1(text.encode()).hexdigest()[:8]
    return safe


def require_out_dir(example: Example, task: str, out_dir: PathLike | None) -> PathLike:
    """``out_dir``, or an error saying how to pass it; the example needs an ``id`` (it names
    the file)."""
    if out_dir is None:
        raise bad(
            example,
            task,
            "this builder writes an image: pass out_dir= the folder to write "
            f"it to, e.g. create('task', '{task}')(example, out_dir=..., image_root=...)",
        )
    need(example, task, "id")
    return out_dir


def write_image(
    image: Any,
    example: Example,
    task: str,
    suffix: str,
    out_dir: PathLike | None,
    image_root: PathLike | None,
) -> str:
    """Save ``image`` as ``<out_dir>/<id>.<suffix>.png`` (atomically) and return the path the
    record names: relative to ``image_root`` when given (a relative ``out_dir`` is then taken
    under it, and an absolute one must lie inside it, since records are read under one data
    root), else ``out_dir/<file>`` as given."""
    out_dir = require_out_dir(example, task, out_dir)
    name = f"{_file_stem(example['id'])}.{suffix}.png"
    folder = Path(out_dir)
    if image_root is not None:
        root = Path(image_root).resolve()
        folder = (root / folder).resolve()
        if not folder.is_relative_to(root):
            raise bad(
                example,
                task,
                f"out_dir '{out_dir}' lies outside image_root '{image_root}'; "
                "records name images relative to their data root, so write inside it",
            )
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / name
    partial = folder / f".{name}.{os.getpid()}.partial"
    image.save(partial, format="PNG")
    os.replace(partial, target)
    if image_root is not None:
        return target.relative_to(Path(image_root).resolve()).as_posix()
    return (Path(out_dir) / name).as_posix()
