"""The video next-frame family: the research code's pure-video tasks, verbatim
(facebookresearch/metamorph 0b13deb, ``metamorph/train/train.py`` 870-999,
``generate_text_description``, fed by ``processVideo`` 1005-1033).

Every builder takes ``{"id", "frames": [paths in time order], "interval": seconds}``: frames
already sampled, ``interval`` seconds apart. The research code samples them itself, at a random
interval rounded to 0.1 s between ``max(2 / fps, 0.1)`` and ``min(10, max(length / 2, ...))``
seconds, at most 45 frames (train.py 1017-1029); here that sampling is the data preparation's
job (give at most 45 frames to stay within what the research code trained on). ``{t}`` in the
phrasings is the interval as :func:`~metamorph_train.tasks._common.seconds` writes it.

Randomness (phrasing, split point, shuffle, count, sub-clip, task type) is drawn from the
keyword ``rng`` when given, else from ``random.Random(str(example["id"]))``, so a record is a
pure function of its example unless you pass an ``rng``. Draws are uniform, as the research
code's ``random.choice`` / ``random.randint``. Each builder needs at least 2 frames.

An ``<image>`` in the answer is a frame the model generates; the record's ``image`` list is in
tag order, which is the research code's image order for each type.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from metamorph_train.tasks._common import TAG, Example, Record, frame_list, record, rng_for, seconds

TWO_FRAME_PHRASINGS: tuple[tuple[str, str], ...] = (
    (f"{TAG} Predict visually what's going to happen in {{t}} seconds.", TAG),
    (
        f"Check out this snapshot {TAG}. Fast forward {{t}} seconds - what do you think we'll see?",
        f"Time travel complete! Here's your future frame: {TAG}",
    ),
    (
        f"{TAG} Imagine this scene evolving over the next {{t}} seconds. "
        "What's your visual prediction?",
        f"Ta-da! Your crystal ball reveals: {TAG}",
    ),
    (
        f"Given this starting point {TAG}, can you forecast the visual outcome {{t}} "
        "seconds later?",
        f"Forecast delivered! Your updated scene: {TAG}",
    ),
    (
        f"{TAG} If we hit the fast-forward button for {{t}} seconds, what would we likely observe?",
        f"Fast-forward complete! Observe the result: {TAG}",
    ),
    (
        f"Picture this: {TAG}. Now, let's jump {{t}} seconds into the future. "
        "What do you envision?",
        f"Vision materialized! Here's your future snapshot: {TAG}",
    ),
    (
        f"{TAG} Using your imagination, how do you think this scene will transform in {{t}} "
        "seconds?",
        f"Transformation complete! Behold the new scene: {TAG}",
    ),
    (
        f"Starting from this image {TAG}, predict the visual progression after {{t}} seconds.",
        f"Progression predicted! Your updated image awaits: {TAG}",
    ),
    (
        f"{TAG} If we could peek {{t}} seconds into the future, what would this scene look like?",
        f"Peek granted! Future scene revealed: {TAG}",
    ),
    (
        f"Analyze this initial frame {TAG}. How do you expect it to change in {{t}} seconds?",
        f"Analysis complete! Expected change visualized: {TAG}",
    ),
    (
        f"{TAG} Let's play futurist. Project this scene forward by {{t}} seconds.",
        f"Future projected! Your advanced timeline shows: {TAG}",
    ),
    (f"{TAG} Please predict the next state:", f"This is my answer: {TAG}"),
)
"""The 12 two-frame (question, answer) pairs of train.py 872-926, ``{t}`` the interval; the
question shows frame 0, the answer generates frame 1."""

Built = tuple[str, str, list[str]]  # human, gpt, images in tag order


def _tags(n: int, sep: str) -> str:
    return sep.join([TAG] * n)


def _s(n: int) -> str:
    return "s" if n > 1 else ""


def _two_frame(frames: list[str], t: str, rng: random.Random) -> Built:
    question, answer = rng.choice(TWO_FRAME_PHRASINGS)
    return question.replace("{t}", t), answer.replace("{t}", t), frames[:2]


def _simple(clip: list[str], t: str, rng: random.Random) -> Built:
    # train.py 941-945: the first frame shown, the next S-1 generated (tags joined by ' ')
    n = len(clip) - 1
    return (
        f"I have a video starting with this frame: {TAG}. Can you predict what happens in the "
        f"next {n} frames, each {t} seconds apart?",
        f"Certainly! I'll generate the next {n} frames, each {t} seconds apart. Here are my "
        f"predictions: {_tags(n, ' ')}",
        clip,
    )


def _split(clip: list[str], t: str, rng: random.Random) -> Built:
    # train.py 948-953: the first k shown, the remaining S-k generated (tags joined by '')
    s = len(clip)
    k = rng.randint(1, s - 1)
    rest = s - k
    return (
        f"I've seen the first {k} frame{_s(k)} of a {s}-frame video sequence, each frame {t} "
        f"seconds apart: {_tags(k, '')}. What do you think happens in the remaining {rest} "
        f"frame{_s(rest)}?",
        f"Based on the first {k} frame{_s(k)} you've seen, I'll predict the remaining {rest} "
        f"frame{_s(rest)}, each {t} seconds apart. Here's what I think happens next: "
        f"{_tags(rest, '')}",
        clip,
    )


def _reverse(clip: list[str], t: str, rng: random.Random) -> Built:
    # train.py 956-960: the last frame shown, the earlier ones generated latest first
    s = len(clip)
    return (
        f"I have the final frame of a {s}-frame video, where each frame is {t} seconds apart: "
        f"{TAG}. Can you work backwards and predict the previous {s - 1} frames?",
        f"Interesting challenge! I'll work backwards to generate the previous {s - 1} frames, "
        f"each {t} seconds apart. Here's my reverse prediction: {_tags(s - 1, '')}",
        clip[::-1],
    )


def _alternating(clip: list[str], t: str, rng: random.Random) -> Built:
    # train.py 963-967: frames 0, 2, 4, ... shown (' '), frames 1, 3, ... generated ('')
    s, shown, missing = len(clip), clip[::2], clip[1::2]
    return (
        f"I have a {s}-frame video where I can only see every other frame, each {t} seconds "
        f"apart: {_tags(len(shown), ' ')}. Can you predict the {len(missing)} missing frames?",
        f"Of course! I'll predict the {len(missing)} missing frames to complete the {s}-frame "
        f"sequence, where each frame is {t} seconds apart. Here are the frames I think are "
        f"missing: {_tags(len(missing), '')}",
        shown + missing,
    )


def _reorder(clip: list[str], t: str, rng: random.Random) -> Built:
    # train.py 970-977: the frames shown shuffled, then all generated in time order
    s = len(clip)
    order = list(range(s))
    rng.shuffle(order)
    return (
        f"I have a series of {s} video frames, each {t} seconds apart, but they're all mixed "
        f"up: {_tags(s, ' ')}. Can you put them in the right order?",
        f"I'd be happy to help! You gave me these {s} frames, each {t} seconds apart, in this "
        f"order: {_tags(s, ' ')}.",
        [clip[i] for i in order] + clip,
    )


def _time_interval(clip: list[str], t: str, rng: random.Random) -> Built:
    # train.py 980-984: all frames shown, a text answer
    s = len(clip)
    return (
        f"I have a series of {s} video frames: {_tags(s, ' ')}. Can you tell me how much time "
        "passes between each frame?",
        f"To determine the time interval, I'll analyze the changes between each of the {s} "
        f"frames. Based on my analysis, I estimate that approximately {t} seconds pass between "
        f"each frame in this {s}-frame sequence.",
        clip,
    )


def _predict_next(frames: list[str], t: str, rng: random.Random, count: int | None = None) -> Built:
    # train.py 987-992: the context shown, the following X (1-3) frames generated (' ')
    x = count if count is not None else rng.randint(1, min(3, len(frames) - 1))
    shown = len(frames) - x
    return (
        f"Here is a sequence of images: {_tags(shown, ' ')}. Predict the next {x} image{_s(x)} "
        "in the sequence.",
        f"Based on the given sequence of images, I'll predict the next {x} image{_s(x)} in the "
        f"sequence. Here {'are' if x > 1 else 'is'} my prediction{_s(x)}: {_tags(x, ' ')}",
        frames,
    )


VIDEO_TASK_TYPES: dict[str, Callable[[list[str], str, random.Random], Built]] = {
    "video-next-frame": _simple,
    "video-split": _split,
    "video-reverse": _reverse,
    "video-alternating": _alternating,
    "video-reorder": _reorder,
    "video-time-interval": _time_interval,
    "video-predict-next": _predict_next,
}
"""The 7 task types for 3+ frames (train.py 941-992), by task name, in the research order."""


def _emit(example: Example, task: str, built: Built) -> Record:
    human, gpt, images = built
    return record(example, task, images, human, gpt)


def _build(task: str, example: Example, rng: random.Random | None) -> Record:
    frames, t = frame_list(example, task), seconds(example, task)
    return _emit(example, task, VIDEO_TASK_TYPES[task](frames, t, rng_for(example, rng)))


def video_next_frame(example: Example, *, rng: random.Random | None = None) -> Record:
    """Two frames: one of the 12 :data:`TWO_FRAME_PHRASINGS` (drawn uniformly), frame 0 shown,
    frame 1 generated. Three or more: the research code's "simple" type on all the frames:
    "I have a video starting with this frame: <image>. Can you predict what happens in the next
    {S-1} frames, each {t} seconds apart?" / "Certainly! ... Here are my predictions: <image>
    <image> ..." (S-1 tags joined by spaces), frame 0 shown, the others generated in order."""
    frames, t = frame_list(example, "video-next-frame"), seconds(example, "video-next-frame")
    r = rng_for(example, rng)
    built = _two_frame(frames, t, r) if len(frames) == 2 else _simple(frames, t, r)
    return _emit(example, "video-next-frame", built)


def video_split(example: Example, *, rng: random.Random | None = None) -> Record:
    """Asks "I've seen the first {k} frame(s) of a {S}-frame video sequence ..." with k uniform in
    [1, S-1]: the first k frames shown, the remaining S-k generated in order (tags joined by '';
    "frame"/"frames" by count)."""
    return _build("video-split", example, rng)


def video_reverse(example: Example, *, rng: random.Random | None = None) -> Record:
    """Asks "I have the final frame of a {S}-frame video ...": the last frame shown, the previous
    S-1 generated from latest to earliest (images ``frames[::-1]``, tags joined by '')."""
    return _build("video-reverse", example, rng)


def video_alternating(example: Example, *, rng: random.Random | None = None) -> Record:
    """Asks "I have a {S}-frame video where I can only see every other frame ...": frames 0, 2, ...
    shown (tags joined by ' '), frames 1, 3, ... generated in order (tags joined by ''); images
    ``frames[::2] + frames[1::2]``."""
    return _build("video-alternating", example, rng)


def video_reorder(example: Example, *, rng: random.Random | None = None) -> Record:
    """Asks "I have a series of {S} video frames, each {t} seconds apart, but they're all mixed up:
    ..." with the S frames shown in a uniformly shuffled order; the answer "I'd be happy to help!
    You gave me these {S} frames, ..., in this order: <image> ... ." generates all S frames in time
    order (images: the shuffled frames, then the frames in order). As in the research code the
    shuffle may leave the order unchanged; the answer is then still right."""
    return _build("video-reorder", example, rng)


def video_time_interval(example: Example, *, rng: random.Random | None = None) -> Record:
    """Asks "I have a series of {S} video frames: ... Can you tell me how much time passes between
    each frame?": every frame shown, a text answer stating ``{t}``; nothing generated."""
    return _build("video-time-interval", example, rng)


def video_predict_next(example: Example, *, rng: random.Random | None = None) -> Record:
    """Asks "Here is a sequence of images: ... Predict the next {X} image(s) in the sequence." with
    X uniform in [1, min(3, S-1)]: the first S-X frames shown, the last X generated in order (tags
    joined by ' '; "image"/"images", "is"/"are" by X)."""
    return _build("video-predict-next", example, rng)


def video(example: Example, *, rng: random.Random | None = None) -> Record:
    """The research code's video task (train.py 929-997): exactly 2 frames -> one of the 12
    two-frame phrasings; 3 or more -> a sub-clip ``frames[start:end+1]`` with ``start``
    uniform in [0, n-2] and ``end`` in [start+1, n-1] (so 2 to n frames), then one of the 7
    :data:`VIDEO_TASK_TYPES` uniformly, on that sub-clip.

    Predict-next differs from the research code where it would emit an answer claiming images
    it lacks: there X is drawn in [1, min(3, n - end)] and the answer shows the frames after
    ``end`` that exist, so at the video's end it names X images but holds none, and X = frames
    left + 1 holds one too few. Here X is drawn among the frames that exist after the sub-clip,
    [1, min(3, n-1-end)]; when none follow (``end == n-1``) the last X of the sub-clip, X in
    [1, min(3, S-1)], become the frames to predict. Every answer holds exactly X images.
    """
    frames, t = frame_list(example, "video"), seconds(example, "video")
    r = rng_for(example, rng)
    n = len(frames)
    if n == 2:
        return _emit(example, "video", _two_frame(frames, t, r))
    start = r.randint(0, n - 2)
    end = r.randint(start + 1, n - 1)
    kind = r.choice(list(VIDEO_TASK_TYPES))
    clip = frames[start : end + 1]
    if kind != "video-predict-next":
        return _emit(example, "video", VIDEO_TASK_TYPES[kind](clip, t, r))
    after = n - 1 - end
    x = r.randint(1, min(3, after)) if after else r.randint(1, min(3, len(clip) - 1))
    if after:
        clip = frames[start : end + 1 + x]
    return _emit(example, "video", _predict_next(clip, t, r, count=x))
