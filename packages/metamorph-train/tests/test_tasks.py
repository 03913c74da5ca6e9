"""Task builders: the research code's phrasings verbatim, image order, generated images, the
images some builders draw, reproducible randomness and errors that name the problem."""

from __future__ import annotations

import random
import re

import numpy as np
import pytest
from PIL import Image

from metamorph_core import Conversation, create
from metamorph_train.data.records import check_record
from metamorph_train.tasks import (
    COT_GPT_PREFIXES,
    COT_HUMAN_PREFIXES,
    TASKS,
    TWO_FRAME_PHRASINGS,
    VIDEO_TASK_TYPES,
    VSTAR_ENCOURAGEMENTS,
)

FRAMES = [f"f{i}" for i in range(5)]
CLIP = {"id": "v1", "frames": FRAMES, "interval": 0.5}
ALL = ["<image>"] * 5


def split_images(record: dict) -> tuple[list[str], list[str]]:
    """(context, generated) images: consumed in tag order, generated when in a gpt turn."""
    images, context, generated = list(record["image"]), [], []
    for turn in record["conversations"]:
        n = turn["value"].count("<image>")
        (generated if turn["from"] == "gpt" else context).extend(images[:n])
        images = images[n:]
    assert not images
    return context, generated


def texts(record: dict) -> tuple[str, str]:
    return record["conversations"][0]["value"], record["conversations"][1]["value"]


def check(record: dict) -> dict:
    conversation = Conversation.from_llava(check_record(record, "test"))
    assert conversation.num_placeholders == len(record["image"])
    return record


@pytest.fixture
def root(tmp_path):
    (tmp_path / "img").mkdir()
    pixels = np.zeros((48, 64, 3), np.uint8)
    pixels[..., 0] = np.arange(64)[None, :] * 3  # a gradient: crops are recognisable
    pixels[..., 1] = np.arange(48)[:, None] * 4
    pixels[..., 2] = 255
    Image.fromarray(pixels).save(tmp_path / "img" / "a.png")
    return tmp_path


def test_phrasing_lists_are_the_research_codes():
    assert len(TWO_FRAME_PHRASINGS) == 12 and len(VIDEO_TASK_TYPES) == 7
    assert TWO_FRAME_PHRASINGS[1] == (
        "Check out this snapshot <image>. Fast forward {t} seconds - what do you think we'll see?",
        "Time travel complete! Here's your future frame: <image>",
    )
    assert TWO_FRAME_PHRASINGS[11] == (
        "<image> Please predict the next state:",
        "This is my answer: <image>",
    )
    assert len(COT_HUMAN_PREFIXES) == 13 and COT_HUMAN_PREFIXES[-1] == ""
    assert "Visualize the critical area," in COT_HUMAN_PREFIXES
    assert len(COT_GPT_PREFIXES) == 16 and COT_GPT_PREFIXES[-1] == ""
    assert "Acknowledging the visual detail:" in COT_GPT_PREFIXES
    assert len(VSTAR_ENCOURAGEMENTS) == 15 and COT_GPT_PREFIXES[:-1] == VSTAR_ENCOURAGEMENTS
    assert VSTAR_ENCOURAGEMENTS[0] == "Ok, let's focus on the important part:"


def test_every_task_is_registered_old_names_included():
    for name, (fn, _) in TASKS.items():
        assert create("task", name) is fn
    for old in (
        "text-to-image",
        "image-edit",
        "video-next-frame",
        "video-reorder",
        "visual-thinking",
        "text",
    ):
        assert old in TASKS


def test_two_frames_use_the_twelve_phrasings_frame_0_shown_frame_1_generated():
    record = check(
        create("task", "video-next-frame")({"id": "clip-2", "frames": ["a", "b"], "interval": 1.5})
    )
    assert texts(record) == (
        "Given this starting point <image>, can you forecast the visual outcome 1.5 seconds later?",
        "Forecast delivered! Your updated scene: <image>",
    )
    assert split_images(record) == (["a"], ["b"])
    drawn = {
        texts(create("task", "video")({"id": k, "frames": ["a", "b"], "interval": 2}))
        for k in range(300)
    }
    assert drawn == {(q.replace("{t}", "2.0"), a) for q, a in TWO_FRAME_PHRASINGS}


def test_the_seven_video_types_on_a_fixed_clip():
    expected = {
        "video-next-frame": (
            "I have a video starting with this frame: <image>. Can you predict what happens in "
            "the next 4 frames, each 0.5 seconds apart?",
            "Certainly! I'll generate the next 4 frames, each 0.5 seconds apart. Here are my "
            "predictions: <image> <image> <image> <image>",
            ["f0"],
            ["f1", "f2", "f3", "f4"],
        ),
        "video-split": (
            "I've seen the first 3 frames of a 5-frame video sequence, each frame 0.5 seconds "
            "apart: <image><image><image>. What do you think happens in the remaining 2 frames?",
            "Based on the first 3 frames you've seen, I'll predict the remaining 2 frames, each "
            "0.5 seconds apart. Here's what I think happens next: <image><image>",
            ["f0", "f1", "f2"],
            ["f3", "f4"],
        ),
        "video-reverse": (
            "I have the final frame of a 5-frame video, where each frame is 0.5 seconds apart: "
            "<image>. Can you work backwards and predict the previous 4 frames?",
            "Interesting challenge! I'll work backwards to generate the previous 4 frames, each "
            "0.5 seconds apart. Here's my reverse prediction: <image><image><image><image>",
            ["f4"],
            ["f3", "f2", "f1", "f0"],
        ),
        "video-alternating": (
            "I have a 5-frame video where I can only see every other frame, each 0.5 seconds "
            "apart: <image> <image> <image>. Can you predict the 2 missing frames?",
            "Of course! I'll predict the 2 missing frames to complete the 5-frame sequence, "
            "where each frame is 0.5 seconds apart. Here are the frames I think are missing: "
            "<image><image>",
            ["f0", "f2", "f4"],
            ["f1", "f3"],
        ),
        "video-reorder": (
            "I have a series of 5 video frames, each 0.5 seconds apart, but they're all mixed "
            f"up: {' '.join(ALL)}. Can you put them in the right order?",
            "I'd be happy to help! You gave me these 5 frames, each 0.5 seconds apart, in this "
            f"order: {' '.join(ALL)}.",
            ["f0", "f4", "f3", "f1", "f2"],  # shuffled (seeded by the id)
            FRAMES,  # generated in time order
        ),
        "video-time-interval": (
            f"I have a series of 5 video frames: {' '.join(ALL)}. Can you tell me how much time "
            "passes between each frame?",
            "To determine the time interval, I'll analyze the changes between each of the 5 "
            "frames. Based on my analysis, I estimate that approximately 0.5 seconds pass "
            "between each frame in this 5-frame sequence.",
            FRAMES,
            [],
        ),
        "video-predict-next": (
            "Here is a sequence of images: <image> <image>. Predict the next 3 images in the "
            "sequence.",
            "Based on the given sequence of images, I'll predict the next 3 images in the "
            "sequence. Here are my predictions: <image> <image> <image>",
            ["f0", "f1"],
            ["f2", "f3", "f4"],
        ),
    }
    for name, (human, gpt, context, generated) in expected.items():
        record = check(create("task", name)(CLIP))
        assert record["id"] == "v1"
        assert texts(record) == (human, gpt), name
        assert split_images(record) == (context, generated), name
        assert create("task", name)(dict(CLIP)) == record  # reproducible from the id


def test_singular_forms_and_an_explicit_rng():
    two = {"id": "s", "frames": ["a", "b"], "interval": 3}
    human, gpt = texts(create("task", "video-split")(two))
    assert "the first 1 frame of a 2-frame" in human and "remaining 1 frame?" in human
    assert "the remaining 1 frame, each 3.0 seconds" in gpt
    human, gpt = texts(create("task", "video-predict-next")(two))
    assert (
        human == "Here is a sequence of images: <image>. Predict the next 1 image in the sequence."
    )
    assert gpt.endswith("next 1 image in the sequence. Here is my prediction: <image>")
    draws = {texts(create("task", "video-split")(CLIP, rng=random.Random(s)))[0] for s in range(40)}
    assert len(draws) == 4  # k = 1..4


def _video_type(human: str) -> str:
    starts = {
        "I have a video starting": "video-next-frame",
        "I've seen the first": "video-split",
        "I have the final frame": "video-reverse",
        "I have a series of": "video-reorder" if "mixed up" in human else "video-time-interval",
        "Here is a sequence": "video-predict-next",
    }
    if "every other frame" in human:
        return "video-alternating"
    return next(v for k, v in starts.items() if human.startswith(k))


def test_video_draws_a_sub_clip_and_one_of_seven_types_answers_hold_what_they_claim():
    frames = [f"f{i}" for i in range(6)]
    seen, clip_ends = set(), set()
    for k in range(400):
        record = check(create("task", "video")({"id": k, "frames": frames, "interval": 1}))
        human, gpt = texts(record)
        kind = _video_type(human)
        seen.add(kind)
        used = sorted(set(record["image"]), key=frames.index)
        first = frames.index(used[0])
        assert used == frames[first : first + len(used)] and len(used) >= 2  # a contiguous clip
        if kind == "video-predict-next":
            x = int(re.search(r"Predict the next (\d) image", human).group(1))
            context, generated = split_images(record)
            assert 1 <= x <= 3 and generated == used[-x:] and len(generated) == x
            assert gpt.count("<image>") == x and context == used[:-x]
            clip_ends.add(used[-1] == frames[-1])
    assert seen == set(VIDEO_TASK_TYPES) and clip_ends == {True, False}
    again = create("task", "video")({"id": 7, "frames": frames, "interval": 1})
    assert again == create("task", "video")({"id": 7, "frames": frames, "interval": 1})


def test_video_qa_prepends_the_frame_tags_to_the_question():
    record = check(
        create("task", "video-qa")(
            {
                "id": "k700-1",
                "frames": ["a", "b", "c"],
                "question": "What happens?",
                "answer": "A dog runs.",
            }
        )
    )
    assert texts(record) == ("<image><image><image>What happens?", "A dog runs.")
    assert split_images(record) == (["a", "b", "c"], [])
    long = {"id": "k", "frames": [f"f{i}" for i in range(50)], "question": "Q?", "answer": "A"}
    assert create("task", "video-qa")(long)["image"] == long["frames"][:45]  # the first 45 s
    assert len(create("task", "video-qa")(long, max_frames=None)["image"]) == 50
    with pytest.raises(ValueError, match="task 'video-qa': example 'k'.*1 frame/s"):
        create("task", "video-qa")({**long, "interval": 2})
    with pytest.raises(ValueError, match="task 'video-qa': example 'k'.*already holds '<image>'"):
        create("task", "video-qa")({**long, "question": "<image>Q?"})


COT = {
    "id": "cot-1",
    "image": "img/a.png",
    "question": "<image>\nWhat is on the table? Please provide the bounding box coordinate of "
    "the region that can help you answer the question better.",
    "answer": "A cup.",
}


def test_visual_cot_with_a_crop_path_is_pure():
    record = check(create("task", "visual-cot")({**COT, "crop": "img/a_crop.png"}))
    assert texts(record) == (
        "Visualize the significant aspect, <image>\nWhat is on the table?",
        "Visualize the relevant aspect: <image> A cup.",
    )
    assert split_images(record) == (["img/a.png"], ["img/a_crop.png"])
    alias = create("task", "visual-thinking")({**COT, "crop": "img/a_crop.png"})
    assert alias == record
    pairs = {
        texts(create("task", "visual-cot")({**COT, "crop": "c"}, rng=random.Random(s)))
        for s in range(600)
    }
    assert {h.split(" <image>")[0] for h, _ in pairs} == {p for p in COT_HUMAN_PREFIXES}
    assert {g.split(" <image>")[0] for _, g in pairs} == {p for p in COT_GPT_PREFIXES}


def test_visual_cot_with_a_box_writes_the_crop(root):
    original = np.asarray(Image.open(root / "img" / "a.png"))
    for crop in ([8, 4, 40, 36], "img/a.png###[8, 4, 40, 36]"):
        record = check(
            create("task", "visual-cot")({**COT, "crop": crop}, out_dir="gen", image_root=root)
        )
        assert record["image"] == ["img/a.png", "gen/cot-1.crop.png"]
        assert split_images(record)[1] == ["gen/cot-1.crop.png"]
        written = Image.open(root / "gen" / "cot-1.crop.png")
        assert written.size == (32, 32) and written.mode == "RGB"
        assert np.array_equal(np.asarray(written), original[4:36, 8:40])
    with pytest.raises(ValueError, match="task 'visual-cot': example 'cot-1': .*pass out_dir="):
        create("task", "visual-cot")({**COT, "crop": [8, 4, 40, 36]}, image_root=root)
    with pytest.raises(ValueError, match="task 'visual-cot': example 'cot-1': 'crop' must be"):
        create("task", "visual-cot")(
            {**COT, "crop": [40, 4, 8, 36]}, out_dir="gen", image_root=root
        )
    with pytest.raises(ValueError, match="lies outside image_root"):
        create("task", "visual-cot")(
            {**COT, "crop": [8, 4, 40, 36]}, out_dir="/elsewhere", image_root=root
        )


VSTAR = {
    "id": "vs-1",
    "image": "img/a.png",
    "question": "What is the color of the cup?\n"
    "Additional visual information to focus on: <object>.",
    "answer": "Red.",
    "objects": [{"name": "cup", "bbox": [10, 30, 30, 12]}],
}


def test_vstar_draws_the_boxes_and_answers_in_the_research_phrasing(root):
    record = check(create("task", "vstar")(VSTAR, out_dir="gen", image_root=root))
    assert texts(record) == (
        "Let's think about this visually: <image>\nWhat is the color of the cup?\n",
        "I will identify the key visual elements and answer the question. The key elements are "
        "cup. Then I will identify these elements with bounding boxes <image>. Based on these "
        "highlighted areas, here's my response to the question: Red.",
    )
    assert split_images(record) == (["img/a.png"], ["gen/vs-1.boxes.png"])
    boxed = np.asarray(Image.open(root / record["image"][1])).astype(int)
    original = np.asarray(Image.open(root / "img" / "a.png")).astype(int)
    red = (boxed[..., 0] == 255) & (boxed[..., 1] == 0) & (boxed[..., 2] == 0)
    assert red[30:35, 10:41].all() and red[38:43, 10:41].all()  # top and bottom edges, width 5
    assert red[30:43, 10:15].all() and red[30:43, 36:41].all()  # left and right edges
    assert np.array_equal(boxed[36:38, 16:35], original[36:38, 16:35])  # inside untouched
    name = (boxed[:30] != original[:30]).any(-1)  # the name, drawn in red at (x, y - 20)
    assert name[10:30, 10:40].any() and not name[:10].any() and not name[:, :10].any()
    shift = boxed[:30][name] - original[:30][name]  # antialiased text: redder, less blue
    assert (shift[:, 0] >= 0).all() and (shift[:, 2] <= 0).all()
    assert not red[:, 45:].any()


def test_vstar_names_and_question_cleaning(root):
    three = [{"name": n, "bbox": [1, 1, 2, 2]} for n in ("cup", "plate", "fork")]
    example = {
        **VSTAR,
        "objects": three,
        "question": "<image>\nWhich is left?<object>; <object>.\n",
    }
    human, gpt = texts(check(create("task", "vstar")(example, out_dir="gen", image_root=root)))
    assert (
        human.endswith(" <image>\nWhich is left?")
        and human.split(" <image>")[0] in VSTAR_ENCOURAGEMENTS
    )
    assert "The key elements are cup, plate, and fork. Then I will" in gpt
    two = {**VSTAR, "objects": three[:2]}
    gpt = texts(create("task", "vstar")(two, out_dir="gen", image_root=root))[1]
    assert "The key elements are cup, and plate. Then" in gpt
    with pytest.raises(
        ValueError, match="task 'vstar': example 'vs-1': 'objects' must be a non-empty"
    ):
        create("task", "vstar")({**VSTAR, "objects": []}, out_dir="gen", image_root=root)
    with pytest.raises(ValueError, match="task 'vstar': example 'vs-1': .*pass out_dir="):
        create("task", "vstar")(VSTAR, image_root=root)
    with pytest.raises(
        ValueError, match="task 'vstar': example 'vs-1': image 'img/none.png' not found"
    ):
        create("task", "vstar")({**VSTAR, "image": "img/none.png"}, out_dir="gen", image_root=root)


def test_bad_input_names_the_task_the_example_and_the_fix():
    with pytest.raises(KeyError, match="task 'video': example 'v1' lacks \\['interval'\\]"):
        create("task", "video")({"id": "v1", "frames": FRAMES})
    with pytest.raises(
        ValueError, match="task 'video-reverse': example 'v1': needs at least 2 frames, got 1"
    ):
        create("task", "video-reverse")({**CLIP, "frames": ["a"]})
    with pytest.raises(
        ValueError, match="task 'video-split': example 'v1': 'interval' must be .* positive"
    ):
        create("task", "video-split")({**CLIP, "interval": 0})
    with pytest.raises(ValueError, match="task 'video': example 'v1': 'frames' must be a list"):
        create("task", "video")({**CLIP, "frames": "f0"})
    with pytest.raises(KeyError, match="task 'vstar': example 'x' lacks \\['objects'\\]"):
        create("task", "vstar")({"id": "x", "image": "a", "question": "q", "answer": "a"})
    with pytest.raises(
        ValueError, match="task 'text': example 't': the conversation holds 1 '<image>'"
    ):
        create("task", "text")({"id": "t", "prompt": "<image> hi", "response": "hello"})


def test_every_builder_emits_records_that_parse(root):
    examples = {
        "text-to-image": {"id": 1, "image": "a.png", "caption": "a cat."},
        "image-edit": {
            "id": 2,
            "source": "a.png",
            "target": "b.png",
            "instruction": "make it blue",
        },
        "video-qa": {"id": 3, "frames": ["a", "b"], "question": "Q?", "answer": "A"},
        "visual-cot": {**COT, "crop": [0, 0, 8, 8]},
        "visual-thinking": {**COT, "crop": "c.png"},
        "vstar": VSTAR,
        "text": {"id": 4, "prompt": "2+3?", "response": "5"},
    }
    pure = {"text-to-image", "image-edit", "video-qa", "text"}  # no randomness
    for name in TASKS:
        for k in range(20):
            example = examples.get(name, {**CLIP, "frames": FRAMES[: 2 + k % 4]})
            kwargs: dict = {} if name in pure else {"rng": random.Random(k)}
            if name in ("visual-cot", "vstar"):
                kwargs.update(out_dir="gen", image_root=root)
            record = check(create("task", name)(example, **kwargs))
            tags = sum(t["value"].count("<image>") for t in record["conversations"])
            assert len(record["image"]) == tags
