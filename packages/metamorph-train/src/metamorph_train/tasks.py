"""Task builders: raw sources -> LLaVA-style records with the paper's templates.

Each builder takes one raw example (a dict) and returns a record ``{"id", "image",
"conversations"}``; they are registered as plugins of kind ``task`` (``create("task",
"text-to-image")`` returns the builder). An ``<image>`` in a ``gpt`` turn is generated.
"""

from __future__ import annotations

import random
from typing import Any

GENERATION_ANSWER = "Here is an image based on your request: <image>"


def _record(example: dict[str, Any], images: list[str], human: str, gpt: str) -> dict[str, Any]:
    return {
        "id": example.get("id"),
        "image": images,
        "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}],
    }


def _need(example: dict[str, Any], task: str, *keys: str) -> None:
    missing = [k for k in keys if k not in example]
    if missing:
        raise KeyError(f"task '{task}': example {example.get('id')!r} lacks {missing}")


def text_to_image(example: dict[str, Any]) -> dict[str, Any]:
    """``{"image", "caption"}`` -> "Generate an image of {caption}." / the generated image."""
    _need(example, "text-to-image", "image", "caption")
    caption = example["caption"].strip().rstrip(".")
    return _record(
        example, [example["image"]], f"Generate an image of {caption}.", GENERATION_ANSWER
    )


def image_edit(example: dict[str, Any]) -> dict[str, Any]:
    """``{"source", "target", "instruction"}`` (InstructPix2Pix-style) -> the edited image."""
    _need(example, "image-edit", "source", "target", "instruction")
    return _record(
        example,
        [example["source"], example["target"]],
        f"<image>\n{example['instruction']}",
        "Here is the edited image: <image>",
    )


def video_next_frame(example: dict[str, Any]) -> dict[str, Any]:
    """``{"frames": [...]}`` -> the first frames as context, the last one generated."""
    _need(example, "video-next-frame", "frames")
    frames = example["frames"]
    if len(frames) < 2:
        raise ValueError(f"task 'video-next-frame': example {example.get('id')!r} needs 2+ frames")
    context = "".join("<image>" for _ in frames[:-1])
    return _record(
        example, list(frames), f"{context}\nPredict the next frame of this video.", "<image>"
    )


def video_reorder(example: dict[str, Any]) -> dict[str, Any]:
    """``{"frames": [...]}`` -> the frames shuffled (seeded by the id); the answer is their
    original order as 1-based positions."""
    _need(example, "video-reorder", "frames")
    frames = list(example["frames"])
    order = list(range(len(frames)))
    random.Random(str(example.get("id"))).shuffle(order)
    shown = [frames[i] for i in order]
    answer = ", ".join(str(order.index(i) + 1) for i in range(len(frames)))
    prompt = (
        "".join("<image>" for _ in shown) + "\nThese video frames are shuffled. Give their order."
    )
    return _record(example, shown, prompt, answer)


def visual_thinking(example: dict[str, Any]) -> dict[str, Any]:
    """``{"image", "crop", "question", "answer"}`` -> the model first generates the zoomed crop
    it needs, then answers."""
    _need(example, "visual-thinking", "image", "crop", "question", "answer")
    return _record(
        example,
        [example["image"], example["crop"]],
        f"<image>\n{example['question']}\nThink visually before you answer.",
        f"<image>\n{example['answer']}",
    )


def text(example: dict[str, Any]) -> dict[str, Any]:
    """``{"prompt", "response"}`` -> a text-only conversation."""
    _need(example, "text", "prompt", "response")
    return _record(example, [], example["prompt"], example["response"])


TASKS = {
    "text-to-image": (text_to_image, "caption -> 'Generate an image of ...' + generated image"),
    "image-edit": (image_edit, "source image + instruction -> generated edited image"),
    "video-next-frame": (video_next_frame, "video frames -> generated next frame"),
    "video-reorder": (video_reorder, "shuffled video frames -> their order (text)"),
    "visual-thinking": (visual_thinking, "image + question -> generated zoom crop, then answer"),
    "text": (text, "prompt -> response, no images"),
}
