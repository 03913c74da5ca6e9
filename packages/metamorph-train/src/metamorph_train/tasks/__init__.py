"""Task builders: raw examples -> LLaVA records with the research code's exact phrasings.

Each builder takes one raw example (a dict) and returns ``{"id", "image": [paths],
"conversations": [{"from": "human", ...}, {"from": "gpt", ...}]}``: an ``<image>`` in the gpt
turn is an image the model learns to generate, anywhere else it is context, and ``image``
lists the paths in the order of the tags. They are registered as plugins of kind ``task``
(``create("task", "video")`` returns the builder); keyword arguments are passed at call time,
e.g. ``create("task", "vstar")(example, out_dir="generated", image_root=root)``.

Randomised builders take ``rng=`` (default ``random.Random(str(example["id"]))``, so a record
is reproducible from its example). Builders that draw an image (``vstar``, ``visual-cot`` given
a box) need ``out_dir=`` and read the example's image under ``image_root=``; the others only
name the example's paths and are pure. Missing keys raise ``KeyError``, bad values
``ValueError``, both naming the task and the example id.

Sources: facebookresearch/metamorph at 0b13deb, ``metamorph/train/train.py`` (cited per
builder); the text-to-image answer comes from that project's README.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from metamorph_train.tasks.basic import GENERATION_ANSWER, image_edit, text, text_to_image
from metamorph_train.tasks.video import (
    TWO_FRAME_PHRASINGS,
    VIDEO_TASK_TYPES,
    video,
    video_alternating,
    video_next_frame,
    video_predict_next,
    video_reorder,
    video_reverse,
    video_split,
    video_time_interval,
)
from metamorph_train.tasks.video_qa import VIDEO_QA_MAX_FRAMES, video_qa
from metamorph_train.tasks.visual_cot import (
    COT_GPT_PREFIXES,
    COT_HUMAN_PREFIXES,
    visual_cot,
    visual_thinking,
)
from metamorph_train.tasks.vstar import VSTAR_ENCOURAGEMENTS, vstar

TASKS: dict[str, tuple[Callable[..., dict[str, Any]], str]] = {
    "text-to-image": (text_to_image, "caption -> 'Generate an image of ...' + generated image"),
    "image-edit": (image_edit, "source image + instruction -> generated edited image"),
    "video": (video, "video frames -> one of the research code's video tasks, drawn uniformly"),
    "video-next-frame": (video_next_frame, "first frame(s) -> generated following frame(s)"),
    "video-split": (video_split, "first k frames -> generated remaining frames"),
    "video-reverse": (video_reverse, "last frame -> generated earlier frames, latest first"),
    "video-alternating": (video_alternating, "every other frame -> generated missing frames"),
    "video-reorder": (video_reorder, "shuffled frames -> all frames generated in time order"),
    "video-time-interval": (video_time_interval, "frames -> the seconds between them (text)"),
    "video-predict-next": (video_predict_next, "frames -> generated next 1-3 frames"),
    "video-qa": (video_qa, "frames at 1 frame/s + question -> text answer"),
    "visual-cot": (visual_cot, "image + question -> generated zoom crop, then answer"),
    "visual-thinking": (visual_thinking, "alias of visual-cot"),
    "vstar": (vstar, "image + question -> key objects, generated boxed image, then answer"),
    "text": (text, "prompt -> response, no images"),
}

__all__ = [
    "COT_GPT_PREFIXES",
    "COT_HUMAN_PREFIXES",
    "GENERATION_ANSWER",
    "TASKS",
    "TWO_FRAME_PHRASINGS",
    "VIDEO_QA_MAX_FRAMES",
    "VIDEO_TASK_TYPES",
    "VSTAR_ENCOURAGEMENTS",
    "image_edit",
    "text",
    "text_to_image",
    "video",
    "video_alternating",
    "video_next_frame",
    "video_predict_next",
    "video_qa",
    "video_reorder",
    "video_reverse",
    "video_split",
    "video_time_interval",
    "visual_cot",
    "visual_thinking",
    "vstar",
]
