"""Data: LLaVA records from JSON/JSONL, images under a root, task builders, mixtures."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from metamorph_core import Conversation, create
from metamorph_core.errors import ConversationError
from metamorph_train.data import ConversationDataset, ImageRoot, Mixture, read_records
from metamorph_train.data.images import ImageMemory
from metamorph_train.recipe import DataConfig


def _record(i, image="a.png", answer="red"):
    return {
        "id": f"r{i}",
        "image": image,
        "conversations": [
            {"from": "human", "value": "<image>\nWhat colour?"},
            {"from": "gpt", "value": answer},
        ],
    }


@pytest.fixture
def root(tmp_path):
    (tmp_path / "img").mkdir()
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(tmp_path / "img" / "a.png")
    (tmp_path / "img" / "broken.png").write_bytes(b"not a png")
    return tmp_path


def test_jsonl_and_json_records(root):
    path = root / "data.jsonl"
    path.write_text("\n".join(json.dumps(_record(i)) for i in range(3)) + "\n")
    assert [r["id"] for r in read_records(path)] == ["r0", "r1", "r2"]
    (root / "data.json").write_text(json.dumps([_record(7)]))
    assert read_records(root / "data.json")[0]["id"] == "r7"


def test_malformed_lines_name_file_and_line_or_are_skipped_and_counted(root):
    path = root / "data.jsonl"
    bad = {
        "id": "x",
        "image": "a.png",
        "conversations": [{"from": "gpt", "value": "no placeholder"}],
    }
    path.write_text(json.dumps(_record(0)) + "\n{not json\n" + json.dumps(bad) + "\n")
    with pytest.raises(ConversationError, match=r"data.jsonl:2: malformed JSON"):
        read_records(path)
    counts = {}
    assert [r["id"] for r in read_records(path, "skip", counts)] == ["r0"]
    assert counts == {"bad_records": 2}
    path.write_text(json.dumps(bad) + "\n")
    with pytest.raises(
        ConversationError,
        match=r"data.jsonl:1: record 'x' has 0 '<image>' placeholder\(s\) but 1 image",
    ):
        read_records(path)


def test_images_stay_under_the_root(root):
    images = ImageRoot(root / "img")
    assert images.load("a.png").shape == (3, 8, 8)
    for escape in ("../data.jsonl", "/etc/passwd", "sub/../../x.png"):
        with pytest.raises(ValueError, match="leads outside the data root"):
            images.resolve(escape, "r1")
    (root / "img" / "link.png").symlink_to(root / "outside.png")
    with pytest.raises(ValueError, match="leads outside the data root"):
        images.resolve("link.png", "r1")
    with pytest.raises(FileNotFoundError, match="record 'r9': image 'gone.png' not found"):
        images.load("gone.png", "r9")
    with pytest.raises(ValueError, match="record 'r8': cannot read image file .*broken.png"):
        images.load("broken.png", "r8")


def test_dataset_raises_by_default_and_skips_and_counts_on_request(root):
    path = root / "data.jsonl"
    rows = [
        _record(0),
        _record(1, image="broken.png"),
        _record(2, image="../escape.png"),
        _record(3),
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n")
    with pytest.raises(ConversationError):
        ConversationDataset(path, root / "img")
    data = ConversationDataset(path, root / "img", on_error="skip")
    items = [data[i] for i in range(len(data))]
    assert isinstance(items[0], Conversation) and items[0].images[0].shape == (3, 8, 8)
    assert items[1] is None and items[2] is None and items[3] is not None
    assert data.errors.summary() == {"bad_records": 1, "bad_images": 2}
    path.write_text("not json\n")
    with pytest.raises(ValueError, match="holds no usable records"):
        ConversationDataset(path, root / "img", on_error="skip")


def test_image_memory_decodes_each_file_once_and_hands_out_copies(root):
    Image.fromarray(np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3)).save(
        root / "img" / "b.png"
    )
    path = root / "data.jsonl"
    path.write_text("\n".join(json.dumps(_record(i, image="b.png")) for i in range(3)) + "\n")
    plain = ConversationDataset(path, root / "img")
    memory = ImageMemory(1)
    kept = ConversationDataset(path, root / "img", image_memory=memory)
    expected = plain[0].images[0]
    first = kept[0].images[0]
    assert torch.equal(first, expected) and expected.abs().sum() > 0
    first.zero_()  # what a caller does to its image never reaches the kept one
    (root / "img" / "b.png").unlink()  # later reads come from memory, not from the file
    assert torch.equal(kept[1].images[0], expected)
    assert (memory.hits, memory.misses) == (1, 1)
    assert memory.used == expected.numel() * expected.element_size()
    with pytest.raises(FileNotFoundError, match="b.png"):
        plain[2]


def test_image_memory_keeps_images_up_to_its_limit_and_reads_the_rest(root):
    Image.fromarray(np.full((8, 8, 3), 9, np.uint8)).save(root / "img" / "c.png")
    one = 3 * 8 * 8 * 4  # bytes of one decoded (3, 8, 8) float32 image
    memory = ImageMemory(1.5 * one / 2**20)
    images = ImageRoot(root / "img")
    for _ in range(2):
        for name in ("a.png", "c.png"):
            assert torch.equal(memory.load(images, name), images.load(name))
    assert memory.used == one and (memory.hits, memory.misses) == (1, 3)
    with pytest.raises(FileNotFoundError, match="record 'r9': image 'gone.png' not found"):
        memory.load(images, "gone.png", "r9")
    with pytest.raises(ValueError, match="limit_mb must be > 0"):
        ImageMemory(0)


def test_recipe_key_image_memory_mb_is_checked():
    assert DataConfig(image_memory_mb=64).image_memory_mb == 64
    with pytest.raises(ValueError, match=r"data.image_memory_mb.*got -1"):
        DataConfig(image_memory_mb=-1)
    with pytest.raises(ValueError, match=r"data.image_memory_mb.*got '512'"):
        DataConfig(image_memory_mb="512")


def test_task_builders_use_the_papers_templates():
    t2i = create("task", "text-to-image")({"id": 1, "image": "cat.png", "caption": "a cat."})
    assert t2i["conversations"][0]["value"] == "Generate an image of a cat."
    assert t2i["conversations"][1]["value"] == "Here is an image based on your request: <image>"
    edit = create("task", "image-edit")(
        {"id": 2, "source": "a.png", "target": "b.png", "instruction": "make it blue"}
    )
    assert edit["image"] == ["a.png", "b.png"] and edit["conversations"][1]["value"].endswith(
        "<image>"
    )
    video = create("task", "video-next-frame")(
        {"id": 3, "frames": ["f0", "f1", "f2"], "interval": 1.0}
    )
    assert video["conversations"][0]["value"].startswith(
        "I have a video starting with this frame: <image>. Can you predict what happens in "
        "the next 2 frames, each 1.0 seconds apart?"
    )
    assert video["conversations"][1]["value"].endswith("Here are my predictions: <image> <image>")
    order = create("task", "video-reorder")(
        {"id": 4, "frames": ["f0", "f1", "f2", "f3"], "interval": 0.5}
    )  # the frames shown shuffled, then generated in time order
    assert sorted(order["image"][:4]) == order["image"][4:] == ["f0", "f1", "f2", "f3"]
    assert order["conversations"][1]["value"].count("<image>") == 4
    think = create("task", "visual-thinking")(
        {"id": 5, "image": "i", "crop": "c", "question": "q?", "answer": "a"}
    )
    assert think["image"] == ["i", "c"] and think["conversations"][1]["value"].endswith(
        " <image> a"
    )
    text = create("task", "text")({"id": 6, "prompt": "2+3?", "response": "5"})
    assert text["image"] == []
    for record in (t2i, edit, video, order, think, text):  # all valid, all parse
        Conversation.from_llava(record)
    with pytest.raises(KeyError, match="task 'text-to-image': example 9 lacks \\['caption'\\]"):
        create("task", "text-to-image")({"id": 9, "image": "x"})


def test_mixture_follows_weights_and_resumes_exactly():
    data = {"a": list(range(10)), "b": list(range(100, 130)), "c": list(range(200, 205))}
    mix = Mixture(data, {"a": 1.0, "b": 3.0, "c": 0.0}, seed=3)
    first = [mix.next() for _ in range(400)]
    names = [n for n, _ in first]
    assert names.count("c") == 0 and 0.65 < names.count("b") / 400 < 0.85
    a_items = [x for n, x in first if n == "a"]
    assert sorted(a_items[:10]) == list(range(10))  # each epoch visits every item once
    mix = Mixture(data, {"a": 1.0, "b": 3.0, "c": 0.0}, seed=3)
    for _ in range(150):
        mix.next()
    state = json.loads(json.dumps(mix.state_dict()))
    resumed = Mixture(data, {"a": 1.0, "b": 3.0, "c": 0.0}, seed=3)
    resumed.load_state_dict(state)
    assert [resumed.next() for _ in range(250)] == first[150:]
    with pytest.raises(ValueError, match="dataset 'c' of the mixture is empty"):
        Mixture({"c": []}, {"c": 1.0})
