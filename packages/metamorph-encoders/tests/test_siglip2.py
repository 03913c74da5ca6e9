"""siglip2 on a tiny random SigLIP 2 saved to disk: fixed-size and NaFlex inputs."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
import transformers

from metamorph_core import MetaMorphModel, create
from metamorph_core.conversation import Conversation, ImageFeatures, PixelValues, Turn
from metamorph_core.errors import CheckpointError
from metamorph_core.pixels import split_pixels
from metamorph_core.testing import check_encoder, samples, save_tiny_backbone, tiny_model_config
from metamorph_encoders.testing import save_tiny_siglip2

transformers.utils.logging.disable_progress_bar()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = save_tiny_siglip2(tmp_path_factory.mktemp("siglip2"))
    model = transformers.Siglip2Model.from_pretrained(root, dtype=torch.float32).eval()
    processor = transformers.Siglip2ImageProcessor.from_pretrained(root)
    return {"dir": str(root), "model": model.vision_model, "processor": processor}


def _images() -> list[torch.Tensor]:
    """A tall and a wide uint8 (c, h, w) image."""
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 256, (3, *hw), generator=g, dtype=torch.uint8) for hw in _SIZES]


_SIZES = [(40, 24), (20, 48)]


def _reference(hidden: torch.Tensor, shapes: torch.Tensor, side: int) -> torch.Tensor:
    """Independent: each image's valid rows as its (h, w) grid, bilinear to side x side, L2."""
    out = []
    for x, (h, w) in zip(hidden, shapes.tolist(), strict=True):
        grid = x[: h * w].reshape(h, w, -1).permute(2, 0, 1)[None]
        small = F.interpolate(grid, (side, side), mode="bilinear", align_corners=False)
        out.append(small[0].permute(1, 2, 0).reshape(side * side, -1))
    return F.normalize(torch.stack(out), dim=-1)


def test_fixed_size_passes_the_conformance_suite_and_matches_transformers(saved):
    enc = create("encoder", "siglip2", pretrained=saved["dir"], num_tokens=16, naflex=False)
    assert (enc.image_size, enc.grid, enc.max_num_patches, enc.layer) == ((32, 32), (8, 8), 64, -1)
    check_encoder(enc)
    pixels = enc.preprocess([torch.rand(3, 40, 24), torch.rand(3, 32, 32)])
    patches = pixels.reshape(2, 3, 8, 4, 8, 4).permute(0, 2, 4, 3, 5, 1).reshape(2, 64, 48)
    with torch.no_grad():
        ref = saved["model"](
            pixel_values=patches,
            pixel_attention_mask=torch.ones(2, 64, dtype=torch.long),
            spatial_shapes=torch.tensor([[8, 8], [8, 8]]),
            output_hidden_states=True,
        )
        ours = enc(pixels)
    assert torch.allclose(ours, _reference(ref.hidden_states[-1], torch.tensor([[8, 8]] * 2), 4))
    with pytest.raises(CheckpointError, match="holds a 'siglip2.*' model, not siglip; use"):
        create("encoder", "siglip", pretrained=saved["dir"])


def test_naflex_keeps_aspect_ratios_and_gives_the_fixed_token_count(saved):
    enc = create("encoder", "siglip2", pretrained=saved["dir"], num_tokens=16)
    images = _images()
    inputs = saved["processor"](images=images, return_tensors="pt")
    shapes = inputs["spatial_shapes"]
    assert shapes.tolist() == [[10, 6], [5, 12]] and inputs["pixel_values"].shape == (2, 64, 48)
    with torch.no_grad():
        ours = enc.encode_naflex(**inputs)
        ref = saved["model"](**inputs, output_hidden_states=True).hidden_states[-1]
    assert ours.shape == (2, 16, 32) and ours.dtype == torch.float32
    assert torch.allclose(ours, _reference(ref, shapes, 4), atol=1e-6)
    # our preprocessing (paths, PIL, arrays, tensors) gives the processor's grids and pixels
    mine = enc.preprocess_naflex(images)
    assert torch.equal(mine["spatial_shapes"], shapes)
    assert torch.equal(mine["pixel_attention_mask"], inputs["pixel_attention_mask"])
    assert torch.allclose(mine["pixel_values"], inputs["pixel_values"], atol=0.02)
    # avgpool: each grid adaptively pooled; a grid's padding never reaches its tokens
    pooled = create(
        "encoder", "siglip2", pretrained=saved["dir"], num_tokens=4, reduction="avgpool"
    )
    padded = {**inputs, "pixel_values": inputs["pixel_values"].clone()}
    padded["pixel_values"][1, 60:] = 5.0  # image 1 has 60 valid patches
    with torch.no_grad():
        assert torch.equal(pooled.encode_naflex(**inputs), pooled.encode_naflex(**padded))


def test_naflex_budget_and_reduction_none(saved):
    enc = create("encoder", "siglip2", pretrained=saved["dir"], num_tokens=9, max_num_patches=16)
    assert enc.image_size == (16, 16) and enc.reload_kwargs()["max_num_patches"] == 16
    inputs = enc.preprocess_naflex(_images())
    assert inputs["pixel_values"].shape == (2, 16, 48)
    assert (inputs["spatial_shapes"].prod(-1) <= 16).all()
    with torch.no_grad():
        assert enc.encode_naflex(**inputs).shape == (2, 9, 32)
    none = create("encoder", "siglip2", pretrained=saved["dir"], num_tokens=64, reduction="none")
    with pytest.raises(ValueError, match=r"image 0 has 10x6=60; use reduction='interpolate'"):
        none.encode_naflex(**none.preprocess_naflex(_images()))
    square = none.preprocess_naflex([torch.rand(3, 32, 32)])
    with torch.no_grad():
        assert none.encode_naflex(**square).shape == (1, 64, 32)
    with pytest.raises(ValueError, match=r"expects NaFlex pixel_values \(b, n, 48\)"):
        none.encode_naflex(
            torch.zeros(1, 3, 32, 32), square["pixel_attention_mask"], square["spatial_shapes"]
        )


def test_naflex_is_the_default_and_passes_the_conformance_suite(saved):
    enc = create("encoder", "siglip2", pretrained=saved["dir"], num_tokens=16)
    assert enc.naflex and enc.reload_kwargs()["naflex"] is True
    check_encoder(enc)
    images = _images()
    pixels = enc.preprocess(images)  # what the model and its data loaders hold
    naflex = enc.preprocess_naflex(images)
    assert pixels.keys() == naflex.keys() and all(torch.equal(pixels[k], naflex[k]) for k in pixels)
    with torch.no_grad():
        assert torch.equal(enc(pixels), enc.encode_naflex(**naflex))
    with pytest.raises(ValueError, match=r"reads NaFlex inputs .* got a tensor .* naflex=False"):
        enc(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"got fields \['pixel_values'\]"):
        enc({"pixel_values": naflex["pixel_values"]})


def _conversations() -> list[Conversation]:
    """An understanding sample with a tall image, a generation sample with a wide one."""
    tall, wide = _images()
    return [
        dataclasses.replace(samples.understanding(), images=[tall]),
        dataclasses.replace(samples.generation(), images=[wide]),
    ]


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    return save_tiny_backbone(tmp_path_factory.mktemp("bb") / "llama", "llama")


def _model(saved, backbone, **encoder):
    enc = {"name": "siglip2", "kwargs": {"pretrained": saved["dir"], "num_tokens": 4, **encoder}}
    torch.manual_seed(0)
    return MetaMorphModel.from_config(tiny_model_config(backbone, encoder=enc))


@pytest.mark.parametrize("naflex", [True, False])
def test_a_unified_model_takes_a_vpit_step_with_siglip2(saved, backbone, tmp_path, naflex):
    model = _model(saved, backbone, naflex=naflex)
    convs = _conversations()
    batch = model.prepare_batch(convs)
    pixels, encoder = batch["pixel_values"], model.encoder
    if naflex:  # aspect ratios kept, each image on its own grid; the tokens encode_naflex's
        assert pixels["spatial_shapes"].tolist() == [[10, 6], [5, 12]]
        with torch.no_grad():
            want = encoder.encode_naflex(**encoder.preprocess_naflex([c.images[0] for c in convs]))
            assert torch.equal(model.encode_images(pixels), want)
    else:
        assert pixels.shape == (2, 3, 32, 32)
    # images preprocessed one by one, as the data loader's workers do, make the same batch
    ready = [
        dataclasses.replace(c, images=[PixelValues(split_pixels(encoder.preprocess(c.images))[0])])
        for c in convs
    ]
    with torch.no_grad():
        assert torch.equal(model(**model.prepare_batch(ready)).loss, model(**batch).loss)
    model.train()
    out = model(**batch)
    assert out.visual_tokens == 4 and torch.isfinite(out.loss) and out.visual_loss > 0
    out.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.projector.parameters())
    assert not any(p.grad is not None for p in model.encoder.parameters())
    loaded = MetaMorphModel.from_pretrained(model.save_pretrained(tmp_path / "ckpt"))
    assert (loaded.encoder.max_num_patches, loaded.encoder.naflex) == (64, naflex)
    with torch.no_grad():
        assert torch.equal(model.eval()(**batch).loss, loaded.eval()(**batch).loss)


def test_generation_reads_naflex_prompt_images(saved, backbone):
    model = _model(saved, backbone).eval()
    images = _images()
    prompts = [
        Conversation([Turn("user", "<image>\nWhat colour is the shape?")], [img]) for img in images
    ]
    with torch.no_grad():
        tokens = model.encoder.encode_naflex(**model.encoder.preprocess_naflex(images))
    features = [
        Conversation(p.turns, [ImageFeatures(t)]) for p, t in zip(prompts, tokens, strict=True)
    ]
    settings = {"max_new_tokens": 4, "do_sample": False}
    read = model.generate(prompts, **settings)  # both prompt images preprocessed in one batch
    given = model.generate(features, **settings)
    assert [r.token_ids for r in read] == [r.token_ids for r in given]
    made = model.generate_image("<image>\nthe same, in blue", images=images[:1], max_new_tokens=8)
    assert len(made[0].images) == 1 and made[0].images[0].shape == (4, 32)
