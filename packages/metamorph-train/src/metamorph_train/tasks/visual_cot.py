"""Visual chain of thought: the model first generates the zoomed-in region that answers the
question, then answers (facebookresearch/metamorph 0b13deb, ``metamorph/train/train.py``
1068-1113, the ``"visual_cot"`` samples; prefixes 797-831)."""

from __future__ import annotations

import random
from typing import Any

from metamorph_train.tasks._common import (
    TAG,
    Example,
    PathLike,
    Record,
    bad,
    input_path,
    need,
    open_rgb,
    question_with_tag,
    record,
    require_out_dir,
    rng_for,
    text_field,
    write_image,
)

COT_HUMAN_PREFIXES: tuple[str, ...] = (
    "Imagine the important part visually:",
    "Visualize the critical area,",
    "Picture the relevant detail:",
    "Consider the visual aspect,",
    "Focus on the key visual element:",
    "Imagine the scene with this focus,",
    "Reflect on the visual details:",
    "Visualize the context,",
    "Visualize the significant aspect,",
    "Think about this visually,",
    "Visualize the essential detail:",
    "Envision the visual perspective:",
    "",
)
"""``cot_human_prefixes``, train.py 797-811 (13, the last empty)."""

COT_GPT_PREFIXES: tuple[str, ...] = (
    "Ok, let's focus on the important part:",
    "Alright, let's start by visualizing this:",
    "Let's begin by focusing visually on:",
    "Let's explore this visually:",
    "Let's consider this visually:",
    "Visualize the key area:",
    "Let's imagine the critical detail:",
    "Visualize the relevant aspect:",
    "Let's think about this visually:",
    "Here's the visual perspective:",
    "Acknowledging the visual detail:",
    "Alright, let's address this visually:",
    "Visualizing the critical feature:",
    "Acknowledging the visual context:",
    "Starting with the visual aspect:",
    "",
)
"""``cot_gpt_prefixes``, train.py 814-831 (16, the last empty)."""

BOX_REQUEST = "Please provide the bounding box coordinate of"
"""Visual-CoT's questions end with this request; train.py 1095 cuts it off."""


def _box(example: Example, task: str, crop: Any) -> tuple[int, int, int, int] | None:
    """None for a crop path; else the ``(x1, y1, x2, y2)`` pixel box, from a list of 4 numbers
    or Visual-CoT's ``"path###[x1, y1, x2, y2]"`` (parsed as train.py 1074-1089 does)."""
    if isinstance(crop, str) and "###" not in crop:
        return None
    fix = (
        "'crop' must be the cropped image's path, a box [x1, y1, x2, y2] in pixels with "
        "x1 < x2 and y1 < y2, or Visual-CoT's 'path###[x1, y1, x2, y2]'"
    )
    try:
        values = crop.split("###")[1].strip("[]").split(",") if isinstance(crop, str) else crop
        box = [round(float(v)) for v in values]
    except (TypeError, ValueError, IndexError) as e:
        raise bad(example, task, f"{fix}; got {crop!r}") from e
    if len(box) != 4 or not (box[0] < box[2] and box[1] < box[3]):
        raise bad(example, task, f"{fix}; got {crop!r}")
    return box[0], box[1], box[2], box[3]


def _visual_cot(
    task: str,
    example: Example,
    rng: random.Random | None,
    out_dir: PathLike | None,
    image_root: PathLike | None,
) -> Record:
    need(example, task, "image", "crop")
    image = text_field(example, task, "image")
    question = text_field(example, task, "question").split(BOX_REQUEST)[0].strip()
    answer = text_field(example, task, "answer")
    if not question.replace(TAG, "").strip():
        raise bad(example, task, "the question is empty once its box request is cut off")
    box = _box(example, task, example["crop"])
    if box is None:
        crop = example["crop"]
    else:
        require_out_dir(example, task, out_dir)
        original = open_rgb(example, task, input_path(example, task, "image", image_root))
        crop = write_image(original.crop(box), example, task, "crop", out_dir, image_root)
    r = rng_for(example, rng)
    human_prefix, gpt_prefix = r.choice(COT_HUMAN_PREFIXES), r.choice(COT_GPT_PREFIXES)
    human = f"{human_prefix} {question_with_tag(example, task, question)}"
    return record(example, task, [image, crop], human, f"{gpt_prefix} {TAG} {answer}")


def visual_cot(
    example: Example,
    *,
    rng: random.Random | None = None,
    out_dir: PathLike | None = None,
    image_root: PathLike | None = None,
) -> Record:
    """``{"id", "image", "crop", "question", "answer"}`` -> human ``f"{human_prefix}
    {question}"``, gpt ``f"{gpt_prefix} <image> {answer}"``; the prompt image is ``image``,
    the generated one the crop. The prefixes are drawn uniformly from
    :data:`COT_HUMAN_PREFIXES` then :data:`COT_GPT_PREFIXES` with ``rng`` (default
    ``random.Random(str(example["id"]))``); with the empty prefix the text starts with a space,
    as in the research code.

    ``question`` is cut before :data:`BOX_REQUEST` and stripped (train.py 1095); it holds the
    original's ``<image>`` (LLaVA layout ``"<image>\\n..."`` is added when it has none).

    ``crop`` is the path of the cropped image (the record names it; nothing is read, the
    builder is pure), or a box ``[x1, y1, x2, y2]`` in pixels (or ``"path###[x1, y1, x2,
    y2]"``): then the builder reads ``image`` (under ``image_root`` when given), crops it with
    PIL as the research code does, and writes ``<out_dir>/<id>.crop.png``, named in the record
    relative to ``image_root`` when given (see ``_common.write_image``); ``out_dir`` is then
    required.
    """
    return _visual_cot("visual-cot", example, rng, out_dir, image_root)


def visual_thinking(
    example: Example,
    *,
    rng: random.Random | None = None,
    out_dir: PathLike | None = None,
    image_root: PathLike | None = None,
) -> Record:
    """The ``visual-thinking`` task: the same builder as :func:`visual_cot` (same input, same
    record), kept under its earlier name; its errors name ``visual-thinking``."""
    return _visual_cot("visual-thinking", example, rng, out_dir, image_root)
