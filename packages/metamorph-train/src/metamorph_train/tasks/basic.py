"""Builders whose phrasing comes from the data, not from code: text-to-image, image editing
and text-only samples. Each is a pure function of the example."""

from __future__ import annotations

from metamorph_train.tasks._common import TAG, Example, Record, need, record

GENERATION_ANSWER = f"Here is an image based on your request: {TAG}"
"""The research code has no text-to-image phrasing in code; its README (lines 115-116) gives
the data format ``Generate an image of a puppy.`` / ``Here is an image based on your request:
<image>``, which this answer follows."""


def text_to_image(example: Example) -> Record:
    """``{"id", "image", "caption"}`` -> human ``"Generate an image of {caption}."`` (the
    caption stripped of a final period), gpt :data:`GENERATION_ANSWER`; the image is generated.
    """
    need(example, "text-to-image", "image", "caption")
    caption = example["caption"].strip().rstrip(".")
    return record(
        example,
        "text-to-image",
        [example["image"]],
        f"Generate an image of {caption}.",
        GENERATION_ANSWER,
    )


def image_edit(example: Example) -> Record:
    """``{"id", "source", "target", "instruction"}`` (InstructPix2Pix-style) -> human
    ``"<image>\\n{instruction}"`` with the source, gpt ``"Here is the edited image: <image>"``
    generating the target. (The research code has no editing code: its data holds the
    conversation, README 138-145.)"""
    need(example, "image-edit", "source", "target", "instruction")
    return record(
        example,
        "image-edit",
        [example["source"], example["target"]],
        f"{TAG}\n{example['instruction']}",
        f"Here is the edited image: {TAG}",
    )


def text(example: Example) -> Record:
    """``{"id", "prompt", "response"}`` -> a text-only conversation, no images."""
    need(example, "text", "prompt", "response")
    return record(example, "text", [], example["prompt"], example["response"])
