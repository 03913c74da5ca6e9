"""The toy-world judge: names the attributes of held-out renders, refuses noise, blanks and
mush, round-trips through safetensors, and scores with the documented semantics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metamorph_toy.foreground import UNRECOGNISED, gate, position_of
from metamorph_toy.judge import (
    Judge,
    JudgeConfig,
    correct,
    train_judge,
    validate_judge,
)
from metamorph_toy.stats import t_interval, wilson_interval
from metamorph_toy.world import ATTRIBUTES, Scene, all_scenes, cell_centre, render

STEPS = 150  # enough for >= 0.98 clean accuracy in practice; the asserts leave a margin


@pytest.fixture(scope="module")
def judge() -> Judge:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a shared 2-core machine 1 thread is often several times faster
    try:
        return train_judge(seed=0, steps=STEPS)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def report(judge: Judge) -> dict:
    return validate_judge(judge, seed=1, n=200)


def _renders(n: int, seed: int, size: int = 32) -> tuple[np.ndarray, list[Scene]]:
    rng = np.random.default_rng(seed)
    scenes = [all_scenes()[i] for i in rng.choice(540, size=n, replace=False)]
    return np.stack([render(s, rng, size=size) for s in scenes]), scenes


def test_names_held_out_renders(report):
    assert report["clean"]["accuracy"]["rate"] >= 0.9, report["clean"]
    assert report["blur"]["accuracy"]["rate"] >= 0.75, report["blur"]
    assert report["noise"]["accuracy"]["rate"] >= 0.75, report["noise"]
    assert report["clean"]["named_wrong"]["rate"] <= 0.05, report["clean"]  # rather unrecognised
    low, high = report["clean"]["accuracy"]["ci95"]
    assert low <= report["clean"]["accuracy"]["rate"] <= high


def test_noise_and_blank_images_are_unrecognised_and_never_credited(report):
    for name in ("pure_noise", "blank"):
        control = report["controls"][name]
        assert control["unrecognised"]["rate"] >= 0.9, (name, control)
        assert control["correct"]["k"] == 0, (name, control)


def test_mush_is_not_credited_to_its_source_scene(report):
    for name in ("shuffled_patches", "two_shapes"):
        control = report["controls"][name]
        assert control["correct"]["rate"] <= 0.05, (name, control)
        assert control["unrecognised"]["rate"] >= 0.5, (name, control)


def test_predictions_cover_every_attribute(judge):
    images, _ = _renders(4, seed=3)
    for pred in judge.predict(images):
        assert set(pred) == set(ATTRIBUTES)


def test_float_tensor_and_uint8_array_agree_and_larger_images_are_resized(judge):
    images, scenes = _renders(24, seed=4)
    as_array = judge.predict(images)
    as_tensor = judge.predict(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255)
    assert as_array == as_tensor
    big, big_scenes = _renders(24, seed=5, size=64)
    preds = judge.predict(torch.from_numpy(big).permute(0, 3, 1, 2).float() / 255)
    assert sum(correct(p, s) for p, s in zip(preds, big_scenes, strict=True)) >= 18


def test_bad_inputs_are_refused_with_a_hint(judge):
    with pytest.raises(ValueError, match="uint8"):
        judge.predict(np.zeros((1, 32, 32, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        judge.predict(torch.full((1, 3, 32, 32), 200.0))
    with pytest.raises(ValueError, match="batch dimension"):
        judge.predict(torch.zeros(3, 32, 32))
    with pytest.raises(ValueError, match=r"float\(\) / 255"):
        judge.predict(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


def test_save_load_round_trip(judge, tmp_path):
    judge.save(tmp_path / "judge")
    assert sorted(p.name for p in (tmp_path / "judge").iterdir()) == [
        "judge.json",
        "judge.safetensors",
    ]
    loaded = Judge.load(tmp_path / "judge")
    assert loaded.config == judge.config
    images, _ = _renders(32, seed=6)
    noise = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    batch = np.concatenate([images, noise])
    assert loaded.predict(batch) == judge.predict(batch)
    with pytest.raises(FileNotFoundError, match="judge.json"):
        Judge.load(tmp_path)


def test_training_is_deterministic():
    a, b = train_judge(seed=3, steps=2, batch_size=16), train_judge(seed=3, steps=2, batch_size=16)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name


def test_gate_rejects_noise_and_blanks_and_accepts_renders():
    config = JudgeConfig()
    images, _ = _renders(60, seed=7)
    assert gate(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255, config).all()
    g = torch.Generator().manual_seed(0)
    assert not gate(torch.rand(60, 3, 32, 32, generator=g), config).any()
    assert not gate(torch.full((4, 3, 32, 32), 0.7), config).any()


def test_position_is_the_cell_of_the_centre_or_unrecognised_on_a_boundary():
    centres = torch.tensor([cell_centre(p) for p in ("top left", "centre", "bottom right")])
    assert position_of(centres, margin=1.5) == ["top left", "centre", "bottom right"]
    on_boundary = torch.tensor([[32 / 3 + 0.5, 16.0], [16.0, 64 / 3 - 1.0]])
    assert position_of(on_boundary, margin=1.5) == [UNRECOGNISED, UNRECOGNISED]


def test_correct_needs_every_requested_attribute_right():
    scene = Scene("circle", "red", "small", "top")
    pred = scene.as_dict()
    assert correct(pred, scene)
    assert not correct({**pred, "size": "large"}, scene)
    assert correct({**pred, "size": "large"}, scene, attributes=("shape", "colour"))
    assert not correct({**pred, "colour": UNRECOGNISED}, scene, attributes=("colour",))
    assert not correct(dict.fromkeys(ATTRIBUTES, UNRECOGNISED), scene)
    with pytest.raises(ValueError, match="unknown attribute"):
        correct(pred, scene, attributes=("texture",))


def test_wilson_interval_matches_a_hand_computed_value():
    # 8 of 10 at z = 1.96: centre (0.8 + 0.19208) / 1.38416 = 0.716738,
    # half-width 1.96 * sqrt(0.016 + 0.009604) / 1.38416 = 0.226581
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.490157, abs=1e-5)
    assert high == pytest.approx(0.943319, abs=1e-5)
    assert wilson_interval(0, 50)[0] == 0.0
    assert wilson_interval(50, 50)[1] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="n >= 1"):
        wilson_interval(0, 0)


def test_t_interval_matches_a_hand_computed_value():
    # mean 2, sample sd 1, n 3: 2 +- 4.303 / sqrt(3)
    low, high = t_interval([1.0, 2.0, 3.0])
    assert (low, high) == pytest.approx((2 - 4.303 / 3**0.5, 2 + 4.303 / 3**0.5))
    with pytest.raises(ValueError, match="at least 2"):
        t_interval([0.5])
