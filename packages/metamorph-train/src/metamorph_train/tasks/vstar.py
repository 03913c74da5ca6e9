"""V*: the model names the question's key objects, generates the image with their boxes drawn,
then answers (facebookresearch/metamorph 0b13deb, ``metamorph/train/train.py`` 1147-1176, the
``"vstar"`` samples; helpers 687-752)."""

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
from metamorph_train.tasks.visual_cot import COT_GPT_PREFIXES

VSTAR_ENCOURAGEMENTS: tuple[str, ...] = tuple(p for p in COT_GPT_PREFIXES if p)
"""The 15 encouragements of ``process_vstar_question`` (train.py 692-708): the Visual-CoT gpt
prefixes without the empty one."""

_QUESTION_CLUTTER = (
    "Additional visual information to focus on: ",
    "<object>; <object>.\n",
    "<object>.",
)


def clean_vstar_question(question: str) -> str:
    """The question without V*'s object hints, removed in train.py 689's order."""
    for clutter in _QUESTION_CLUTTER:
        question = question.replace(clutter, "")
    return question


def vstar_answer(names: list[str], answer: str) -> str:
    """``process_vstar_answer`` (train.py 726-739): "a." / "a, and b." / "a, b, and c."."""
    listed = (
        names[0] + "." if len(names) == 1 else ", ".join(names[:-1]) + ", and " + names[-1] + "."
    )
    return (
        "I will identify the key visual elements and answer the question. The key elements are "
        f"{listed} Then I will identify these elements with bounding boxes {TAG}. Based on these "
        f"highlighted areas, here's my response to the question: {answer}"
    )


def _objects(example: Example, task: str) -> list[tuple[str, list[float]]]:
    need(example, task, "objects")
    objects = example["objects"]
    fix = "'objects' must be a non-empty list of {'name': str, 'bbox': [x, y, w, h]} with w, h >= 0"
    if not isinstance(objects, list) or not objects:
        raise bad(example, task, f"{fix}; got {objects!r}")
    out = []
    for k, obj in enumerate(objects):
        box: Any = obj.get("bbox") if isinstance(obj, dict) else None
        name = obj.get("name") if isinstance(obj, dict) else None
        ok = (
            isinstance(name, str)
            and isinstance(box, list | tuple)
            and len(box) == 4
            and all(isinstance(v, int | float) and not isinstance(v, bool) for v in box)
            and box[2] >= 0
            and box[3] >= 0
        )
        if not ok:
            raise bad(example, task, f"{fix}; object {k} is {obj!r}")
        out.append((name, [float(v) for v in box]))
    return out


def vstar(
    example: Example,
    *,
    out_dir: PathLike | None = None,
    image_root: PathLike | None = None,
    rng: random.Random | None = None,
) -> Record:
    """``{"id", "image", "question", "answer", "objects": [{"name", "bbox": [x, y, w, h]}]}`` ->

    * human ``f"{encouragement} {question}"``: the question without V*'s hints
      (:func:`clean_vstar_question`; it holds the original's ``<image>``, LLaVA's
      ``"<image>\\n"`` is put first when it has none), the encouragement drawn uniformly from
      :data:`VSTAR_ENCOURAGEMENTS` with ``rng`` (default ``random.Random(str(example["id"]))``);
    * gpt :func:`vstar_answer` of the object names and ``answer``, whose ``<image>`` is
      generated: the original with every box drawn (PIL ``ImageDraw``: ``rectangle([x, y, x+w,
      y+h], outline="red", width=5)`` and the name in red at ``(x, y-20)`` in PIL's default
      font, train.py 746-752).

    The builder reads ``image`` (under ``image_root`` when given) and writes the boxed image to
    ``<out_dir>/<id>.boxes.png`` (``out_dir`` required); the record's images are ``[image,
    that file]``, the file named relative to ``image_root`` when given (``_common.write_image``).
    """
    task = "vstar"
    need(example, task, "image", "question", "answer", "objects")
    objects = _objects(example, task)
    question = clean_vstar_question(text_field(example, task, "question"))
    answer = text_field(example, task, "answer")
    require_out_dir(example, task, out_dir)  # fail before reading anything
    from PIL import ImageDraw

    boxed = open_rgb(example, task, input_path(example, task, "image", image_root))
    draw = ImageDraw.Draw(boxed)
    for name, (x, y, w, h) in objects:
        draw.rectangle([x, y, x + w, y + h], outline="red", width=5)
        draw.text((x, y - 20), name, fill="red")
    path = write_image(boxed, example, task, "boxes", out_dir, image_root)
    human = f"{rng_for(example, rng).choice(VSTAR_ENCOURAGEMENTS)} "
    human += question_with_tag(example, task, question)
    gpt = vstar_answer([name for name, _ in objects], answer)
    return record(example, task, [example["image"], path], human, gpt)
