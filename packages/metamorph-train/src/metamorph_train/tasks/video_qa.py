"""VideoQA: a question about a video shown as its frames at 1 frame/s (facebookresearch/metamorph
0b13deb, ``metamorph/train/train.py`` 1120-1125, the ``"k700"`` samples)."""

from __future__ import annotations

from metamorph_train.tasks._common import TAG, Example, Record, bad, frame_list, record, text_field

VIDEO_QA_MAX_FRAMES = 45
"""``processVideo``'s ``cutoff`` (train.py 1005): at 1 frame/s the research code keeps the
video's first 45 seconds."""


def video_qa(example: Example, *, max_frames: int | None = VIDEO_QA_MAX_FRAMES) -> Record:
    """``{"id", "frames": [paths at 1 frame/s, in time order], "question", "answer"}`` -> human
    ``"<image><image>...{question}"`` (one tag per frame, prepended with no separator, as train.py
    1124-1125 does), gpt ``answer``; every frame is context, nothing is generated.

    More than ``max_frames`` (45) frames: the first 45 are kept, which is what the research
    code's sampler does (it stops at 45 frames, i.e. the first 45 s; so its skip of samples
    with more than 70 images, train.py 1229-1230, never fires for VideoQA). ``max_frames=None``
    keeps every frame. An ``"interval"`` key, if present, must be 1 (second); the question may
    not hold ``<image>`` tags of its own (the frames' tags are added here).
    """
    task = "video-qa"
    frames = frame_list(example, task, minimum=1)
    question, answer = text_field(example, task, "question"), text_field(example, task, "answer")
    if example.get("interval", 1) != 1:
        raise bad(
            example,
            task,
            f"VideoQA frames are sampled at 1 frame/s (train.py 1122), but "
            f"'interval' is {example['interval']!r}; resample the video at 1 frame/s",
        )
    if TAG in question:
        raise bad(
            example,
            task,
            f"the question already holds '{TAG}'; give the bare question, the "
            "frames' tags are prepended by the builder",
        )
    if max_frames is not None:
        frames = frames[:max_frames]
    return record(example, task, frames, TAG * len(frames) + question, answer)
