"""``metamorph eval generation``: Fréchet distances (streaming statistics, the closed form for
Gaussians, an encoder's and InceptionV3's feature spaces), CLIP score, the GenEval and
DPG-Bench layouts file by file, and the command end to end (resume, refused reruns,
unreadable reference images) on a tiny unified model with a tiny decoder. All offline."""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import pytest
import torch
from gen_helpers import (  # noqa: F401 - fixtures among them
    TINY_ENCODER,
    checkpoint,
    gaussian_samples,
    generator,
    no_download,
    noise_images,
    pixels,
    random_inception,
    save_tiny_clip,
    uint8_batch,
)
from PIL import Image

from metamorph_core import MetaMorphModel, create
from metamorph_core.cli import main
from metamorph_core.testing import build_tiny_tokenizer
from metamorph_core.testing.fixtures import backbone_dirs  # noqa: F401 - a fixture
from metamorph_eval.generation.clip_score import ClipScorer
from metamorph_eval.generation.frechet import (
    INCEPTION_REFUSAL,
    EncoderFeatures,
    FeatureStats,
    InceptionFeatures,
    frechet_distance,
    image_stats,
    stats_distance,
)
from metamorph_eval.generation.images import UnreadableImageError, list_images
from metamorph_eval.generation.prompts import read_prompts
from metamorph_eval.generation.runner import evaluate_generation, image_seed
from metamorph_eval.generation.writers import dpg_grid, write_dpg, write_geneval
from metamorph_eval.runs import RunMismatchError, fingerprint


# -- Fréchet distance ------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["eigh", "sqrtm"])
def test_frechet_identical_and_closed_form(method):
    x = np.random.default_rng(0).standard_normal((200, 6)) * 3 + 1
    same = FeatureStats().update(x)
    assert stats_distance(same, FeatureStats().update(x), method) == pytest.approx(0, abs=1e-8)

    mu1, sd1 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 2.0, 0.5])
    mu2, sd2 = np.array([3.0, 1.0, 0.0]), np.array([2.0, 1.0, 0.5])
    analytic = float(((mu1 - mu2) ** 2).sum() + ((sd1 - sd2) ** 2).sum())  # 9 + 4 + 1 + 1
    assert analytic == 15.0
    got = frechet_distance(mu1, np.diag(sd1**2), mu2, np.diag(sd2**2), method=method)
    assert got == pytest.approx(analytic, abs=1e-9)
    a = FeatureStats().update(gaussian_samples(mu1, sd1, 50, 1))
    b = FeatureStats().update(gaussian_samples(mu2, sd2, 80, 2))
    assert stats_distance(a, b, method) == pytest.approx(analytic, abs=1e-8)


def test_frechet_streaming_equals_all_at_once_and_methods_agree():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((300, 5)) @ rng.standard_normal((5, 5)) + 100.0  # far from 0
    y = rng.standard_normal((250, 5)) @ rng.standard_normal((5, 5)) + 99.0
    streamed = FeatureStats()
    for chunk in np.array_split(x, [1, 7, 50, 51, 200]):
        streamed.update(chunk)
    assert streamed.n == 300
    np.testing.assert_allclose(streamed.mean, x.mean(axis=0), rtol=0, atol=1e-10)
    np.testing.assert_allclose(streamed.cov, np.cov(x, rowvar=False), rtol=1e-10, atol=1e-10)
    whole = FeatureStats().update(x)
    other = FeatureStats().update(torch.from_numpy(y))  # tensors are accepted too
    d = stats_distance(whole, other)
    assert stats_distance(streamed, other) == pytest.approx(d, rel=1e-10)
    assert stats_distance(whole, other, "sqrtm") == pytest.approx(d, rel=1e-7)
    reloaded = FeatureStats.from_state(whole.state())
    assert stats_distance(reloaded, other) == pytest.approx(d, rel=1e-12)


def test_frechet_errors():
    with pytest.raises(ValueError, match="at least 2 images"):
        _ = FeatureStats().update(np.ones((1, 3))).cov
    with pytest.raises(ValueError, match="dimension 4"):
        FeatureStats().update(np.ones((2, 3))).update(np.ones((2, 4)))
    with pytest.raises(ValueError, match="shapes disagree"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="unknown method"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.eye(2), method="svd")


def test_encoder_feature_distance(tmp_path):
    features = EncoderFeatures("tiny-patch", TINY_ENCODER)
    images = noise_images(6, 0)
    got = features(images)
    encoder = create("encoder", "tiny-patch", **TINY_ENCODER)
    with torch.no_grad():
        expected = encoder(encoder.preprocess(images)).mean(dim=1).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
    assert got.shape == (6, 8) and features.identity["pooling"] == "mean of tokens"

    for i, img in enumerate(images):
        img.save(tmp_path / f"{i}.png")
    dark = tmp_path / "dark"
    dark.mkdir()
    for i, img in enumerate(noise_images(6, 1)):
        Image.fromarray(pixels(img) // 4).save(dark / f"{i}.png")
    paths = [tmp_path / f"{i}.png" for i in range(6)]
    a = image_stats(paths, features, batch_size=4)
    assert stats_distance(a, image_stats(paths, features, batch_size=5)) < 1e-9
    assert stats_distance(a, image_stats(list_images(dark), features)) > 1e-3


# -- InceptionV3 (FID) ------------------------------------------------------------------------
@pytest.mark.usefixtures("no_download")
def test_inception_weights_by_path_only(random_inception, tmp_path):  # noqa: F811
    net, root = random_inception
    with pytest.raises(ValueError) as refused:
        InceptionFeatures(None)
    assert str(refused.value) == INCEPTION_REFUSAL
    assert "--inception-weights PATH" in INCEPTION_REFUSAL
    assert "nothing is downloaded" in INCEPTION_REFUSAL

    images = noise_images(2, 0, size=40) + noise_images(1, 1, size=24)  # two sizes
    with torch.no_grad():
        (expected,) = net(uint8_batch(images[:2]))
    for name in ("inception.pth", "inception.safetensors"):
        features = InceptionFeatures(root / name)
        got = features(images)
        assert got.shape == (3, 2048)
        np.testing.assert_allclose(got[:2], expected.numpy(), rtol=1e-5, atol=1e-5)
        assert features.identity["weights"] == str(root / name)

    torch.save({"net": argparse.Namespace()}, tmp_path / "pickled.pth")
    with pytest.raises(ValueError, match="not a state dict of tensors"):
        InceptionFeatures(tmp_path / "pickled.pth")
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        InceptionFeatures(tmp_path / "missing.pth")


@pytest.mark.usefixtures("no_download")
def test_fid_metric_caches_reference_statistics(random_inception, tmp_path):  # noqa: F811
    from metamorph_eval.generation import metrics

    net, root = random_inception
    generated, reference = tmp_path / "gen", tmp_path / "ref"
    for folder, seed in ((generated, 1), (reference, 2)):
        folder.mkdir()
        for i, img in enumerate(noise_images(2, seed, size=20)):
            img.save(folder / f"{i}.png")
    options = metrics.MetricOptions(inception_weights=str(root / "inception.pth"))
    passes = []
    original = metrics._stats

    def counted(paths, *args, **kwargs):
        passes.append(len(paths))
        return original(paths, *args, **kwargs)

    def fid():
        refs = metrics.check_metrics(["fid"], reference, options)
        gen = list_images(generated)
        values, skipped = metrics.compute_metrics(
            ["fid"], gen, ["x"] * 2, refs, options, cache_dir=tmp_path / "run", progress=False
        )
        return values["fid"], skipped

    with pytest.MonkeyPatch.context() as m:
        m.setattr(metrics, "_stats", counted)
        first, skipped = fid()
        assert passes == [2, 2] and skipped == {}  # reference, then generated
        assert (tmp_path / "run" / "reference-fid.npz").is_file()
        again, _ = fid()
        assert passes == [2, 2, 2]  # the reference statistics came from the cache
    assert again == first and first["value"] > 0
    assert (first["n_generated"], first["n_reference"]) == (2, 2)
    with torch.no_grad():
        x = [net(uint8_batch(noise_images(2, s, size=20)))[0] for s in (1, 2)]
    direct = stats_distance(FeatureStats().update(x[0]), FeatureStats().update(x[1]))
    assert first["value"] == pytest.approx(direct, rel=1e-6)


# -- CLIP score ------------------------------------------------------------------------------
def test_clip_score_matches_hand_computation(tmp_path):
    from transformers import CLIPImageProcessor, CLIPModel

    path = save_tiny_clip(tmp_path / "clip")
    texts = ["a red square on the left", "a blue circle", "two plus three is five", "grass"]
    images = noise_images(4, 5)
    got = ClipScorer(path).scores(images, texts)

    model = CLIPModel.from_pretrained(path).eval()
    tok = build_tiny_tokenizer()(texts, padding=True, return_tensors="pt")
    px = CLIPImageProcessor.from_pretrained(path)(images=images, return_tensors="pt")
    with torch.no_grad():
        out = model(
            input_ids=tok["input_ids"],
            attention_mask=tok["attention_mask"],
            pixel_values=px["pixel_values"],
        )
    cos = out.logits_per_image.diagonal() / model.logit_scale.exp()
    expected = (100 * cos.clamp(min=0)).tolist()
    assert got == pytest.approx(expected, abs=1e-4)
    assert len(set(round(v, 4) for v in got)) > 1  # not a constant
    with pytest.raises(FileNotFoundError, match="no config.json"):
        ClipScorer(tmp_path)


# -- layouts ---------------------------------------------------------------------------------
def test_geneval_layout_file_by_file(tmp_path):
    metas = [
        {"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a cat"},
        {"tag": "counting", "include": [{"class": "dog", "count": 2}], "prompt": "two dogs"},
        {"tag": "colors", "prompt": "a blue bench", "include": [{"class": "bench"}]},
    ]
    out = tmp_path / "geneval"
    sets = [noise_images(4, 10 + i) for i in range(3)]
    for index, (meta, images) in enumerate(zip(metas, sets, strict=True)):
        write_geneval(out, index, meta, images)
    assert sorted(os.listdir(out)) == ["00000", "00001", "00002"]
    for index, (meta, images) in enumerate(zip(metas, sets, strict=True)):
        folder = out / f"{index:05d}"
        assert sorted(os.listdir(folder)) == ["metadata.jsonl", "samples"]
        lines = (folder / "metadata.jsonl").read_text().splitlines()
        assert len(lines) == 1 and json.loads(lines[0]) == meta
        with open(folder / "metadata.jsonl") as f:  # how GenEval's scorer reads it
            assert json.load(f) == meta
        assert sorted(os.listdir(folder / "samples")) == [f"{k:04d}.png" for k in range(4)]
        for k, image in enumerate(images):
            np.testing.assert_array_equal(
                pixels(folder / "samples" / f"{k:04d}.png"), pixels(image)
            )
    with pytest.raises(ValueError, match="no 'prompt'"):
        write_geneval(out, 3, {"tag": "x"}, sets[0])


def test_dpg_layout_grid_quadrants(tmp_path):
    images = noise_images(4, 20)
    path = write_dpg(tmp_path / "dpg", "partiprompts12", images)
    assert os.listdir(tmp_path / "dpg") == ["partiprompts12.png"]
    grid = Image.open(path)
    assert grid.size == (32, 32) and grid.mode == "RGB"
    r = 16  # DPG-Bench's scorer crops (0,0,r,r), (r,0,2r,r), (0,r,r,2r), (r,r,2r,2r)
    boxes = [(0, 0, r, r), (r, 0, 2 * r, r), (0, r, r, 2 * r), (r, r, 2 * r, 2 * r)]
    for k, box in enumerate(boxes):
        np.testing.assert_array_equal(pixels(grid.crop(box)), pixels(images[k]))

    small = dpg_grid(images, resolution=8)
    assert small.size == (16, 16)
    for k, box in enumerate([(0, 0, 8, 8), (8, 0, 16, 8), (0, 8, 8, 16), (8, 8, 16, 16)]):
        resized = images[k].resize((8, 8), Image.Resampling.BICUBIC)
        np.testing.assert_array_equal(pixels(small.crop(box)), pixels(resized))
    with pytest.raises(ValueError, match="--images-per-prompt 4"):
        dpg_grid(images[:3])
    with pytest.raises(ValueError, match="first dot"):
        write_dpg(tmp_path / "dpg", "a.b", images)


def test_read_prompts(tmp_path):
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "a cat", "tag": "x"}\n\n{"prompt": "a dog", "id": 7}\n')
    a, b = read_prompts(jsonl)
    assert (a.index, a.id, a.text, a.meta) == (0, "0", "a cat", {"prompt": "a cat", "tag": "x"})
    assert (b.index, b.id) == (1, "7")
    assert len(read_prompts(jsonl, 1)) == 1
    folder = tmp_path / "prompts"
    folder.mkdir()
    (folder / "b2.txt").write_text("second\n")
    (folder / "a1.txt").write_text("first")
    assert [(p.id, p.text) for p in read_prompts(folder)] == [("a1", "first"), ("b2", "second")]
    (tmp_path / "lines.txt").write_text("one\n\ntwo\n")
    assert [p.text for p in read_prompts(tmp_path / "lines.txt")] == ["one", "two"]
    (tmp_path / "bad.jsonl").write_text('{"text": "no prompt"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: .*\"prompt\""):
        read_prompts(tmp_path / "bad.jsonl")


# -- end to end ------------------------------------------------------------------------------
def test_command_end_to_end(checkpoint, tmp_path, monkeypatch, capsys):  # noqa: F811
    prompts = tmp_path / "prompts.jsonl"
    texts = ["a red square", "a blue circle", "a green triangle", "a yellow star"]
    prompts.write_text("".join(json.dumps({"prompt": t, "tag": "x"}) + "\n" for t in texts))
    reference = tmp_path / "reference"
    reference.mkdir()
    for i, img in enumerate(noise_images(5, 30)):
        img.save(reference / f"ref{i}.png")
    out = tmp_path / "run"
    argv = [
        "eval", "generation", "--model", str(checkpoint), "--prompts", str(prompts),
        "--out", str(out), "--reference", str(reference), "--encoder", "tiny-patch",
        "--encoder-kwargs", json.dumps(TINY_ENCODER), "--decoder-steps", "2",
        "--batch-size", "3", "--images-per-prompt", "2", "--layout", "geneval",
    ]  # fmt: skip
    calls = []
    original = MetaMorphModel.generate_image

    def counted(self, prompts, *args, **kwargs):
        calls.append(list(prompts))
        return original(self, prompts, *args, **kwargs)

    monkeypatch.setattr(MetaMorphModel, "generate_image", counted)
    assert main(argv) == 0, capsys.readouterr().err
    assert [len(c) for c in calls] == [3, 1]
    names = sorted(os.listdir(out / "images"))
    assert names == [f"{p:05d}_{k:04d}.png" for p in range(4) for k in range(2)]
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2, 3]
    assert rows[2]["seeds"] == [image_seed(0, 2, 0), image_seed(0, 2, 1)]
    assert rows[1]["prompt"] == "a blue circle"
    results = json.loads((out / "results.json").read_text())
    fd = results["metrics"]["fd-encoder"]
    assert fd["value"] > 0 and (fd["n_generated"], fd["n_reference"]) == (8, 5)
    assert fd["features"]["encoder"] == "tiny-patch"
    settings = results["settings"]
    assert settings["model"]["fingerprint"] == fingerprint(checkpoint)
    assert settings["generation"]["seed"] == 0
    assert settings["generation"]["decoding"] == {"over_decoder_default": {"steps": 2}}
    assert settings["generation"]["images_per_prompt"] == 2
    assert settings["versions"]["torch"] and settings["versions"]["metamorph-eval"]
    assert results["images"] == 8 and results["skipped"] == {}
    geneval = out / "geneval"
    assert sorted(os.listdir(geneval)) == ["00000", "00001", "00002", "00003"]
    assert json.loads((geneval / "00003" / "metadata.jsonl").read_text()) == {
        "prompt": "a yellow star",
        "tag": "x",
    }
    np.testing.assert_array_equal(
        pixels(geneval / "00001" / "samples" / "0001.png"),
        pixels(out / "images" / "00001_0001.png"),
    )

    # a rerun generates nothing and rewrites no image
    mtimes = {n: os.stat(out / "images" / n).st_mtime_ns for n in names}
    calls.clear()
    assert main(argv) == 0
    assert calls == []
    unknown = [*argv[:8], "--reference", str(reference), "--encoder", "no-such-encoder"]
    assert main(unknown) == 2
    assert "unknown encoder 'no-such-encoder'" in capsys.readouterr().err
    assert calls == []
    assert {n: os.stat(out / "images" / n).st_mtime_ns for n in names} == mtimes
    assert len((out / "samples.jsonl").read_text().splitlines()) == 4

    # a lost image: only its prompt runs again, and draws the same picture
    before = pixels(out / "images" / "00003_0001.png")
    (out / "images" / "00003_0001.png").unlink()
    calls.clear()
    assert main(argv) == 0
    assert calls == [["a yellow star"]]
    np.testing.assert_array_equal(pixels(out / "images" / "00003_0001.png"), before)

    # another seed into the same directory is refused with the difference
    capsys.readouterr()
    assert main([*argv[:-8], "--seed", "1", *argv[-8:]]) == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "'seed': 0" in err and "'seed': 1" in err

    # an unreadable reference image: an error naming it, or skipped and counted
    (reference / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    assert main(argv) == 2
    assert "broken.png" in capsys.readouterr().err
    assert main([*argv, "--on-error", "skip"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["skipped"]["reference_unreadable"] == 1
    assert results["skipped"]["reference_unreadable_files"] == [str(reference / "broken.png")]
    assert results["metrics"]["fd-encoder"]["n_reference"] == 5

    # FID without weights is refused before the model is loaded
    calls.clear()
    assert main([*argv[:8], "--metrics", "fid", "--reference", str(reference)]) == 2
    assert "--inception-weights PATH" in capsys.readouterr().err
    assert calls == []
    unknown = [*argv[:8], "--reference", str(reference), "--encoder", "no-such-encoder"]
    assert main(unknown) == 2
    assert "unknown encoder 'no-such-encoder'" in capsys.readouterr().err
    assert calls == []


def test_runner_dpg_layout_and_clip(generator, tmp_path):  # noqa: F811
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    (prompts / "item1.txt").write_text("a red square")
    (prompts / "item2.txt").write_text("a blue circle")
    clip = save_tiny_clip(tmp_path / "clip")
    from metamorph_eval.generation.metrics import MetricOptions

    kwargs = dict(
        batch_size=2,
        images_per_prompt=4,
        seed=3,
        decoding={"steps": 1},
        layout="dpg",
        metrics=["clip"],
        metric_options=MetricOptions(clip=str(clip)),
        progress=False,
        log=None,
    )
    bad = {**kwargs, "decoding": {"steps": 1, "scheduler": "nope"}}
    with pytest.raises(ValueError, match="unknown scheduler 'nope'"):
        evaluate_generation(generator, read_prompts(prompts), tmp_path / "run", **bad)
    # nothing finished in that run, so the corrected settings are not refused
    results = evaluate_generation(generator, read_prompts(prompts), tmp_path / "run", **kwargs)
    dpg = tmp_path / "run" / "dpg"
    assert sorted(os.listdir(dpg)) == ["item1.png", "item2.png"]
    grid = Image.open(dpg / "item2.png")
    assert grid.size == (32, 32)
    for k, box in enumerate([(0, 0, 16, 16), (16, 0, 32, 16), (0, 16, 16, 32), (16, 16, 32, 32)]):
        tile = pixels(tmp_path / "run" / "images" / f"00001_{k:04d}.png")
        np.testing.assert_array_equal(pixels(grid.crop(box)), tile)
    score = results["metrics"]["clip"]
    assert score["n"] == 8 and score["ci95"] is not None and score["value"] >= 0

    with pytest.raises(RunMismatchError, match="visual_guidance_scale"):
        evaluate_generation(
            generator, read_prompts(prompts), tmp_path / "run", visual_guidance_scale=2.0, **kwargs
        )
    with pytest.raises(ValueError, match="seed is set per image"):
        evaluate_generation(
            generator, read_prompts(prompts), tmp_path / "x", **{**kwargs, "decoding": {"seed": 1}}
        )
    with pytest.raises(ValueError, match="--images-per-prompt 4"):
        evaluate_generation(
            generator, read_prompts(prompts), tmp_path / "x", **{**kwargs, "images_per_prompt": 2}
        )


def test_unreadable_image_error_names_file(tmp_path):
    from metamorph_eval.generation.images import read_image

    (tmp_path / "bad.jpg").write_bytes(b"nope")
    with pytest.raises(UnreadableImageError, match="bad.jpg"):
        read_image(tmp_path / "bad.jpg")
