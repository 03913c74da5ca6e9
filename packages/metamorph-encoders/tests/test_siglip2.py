"""siglip2 on a tiny random SigLIP 2 saved to disk: fixed-size and NaFlex inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers

from metamorph_core import MetaMorphModel, create
from metamorph_core.errors import CheckpointError
from metamorph_core.testing import check_encoder, samples, save_tiny_backbone, tiny_model_config

transformers.utils.logging.disable_progress_bar()
TOWER = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "patch_size": 4,
    "num_patches": 64,  # 8x8 position embeddings
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("siglip2")
    torch.manual_seed(0)
    text = {**{k: TOWER[k] for k in TOWER if "patch" not in k}, "vocab_size": 50}
    model = transformers.Siglip2Model(
        transformers.Siglip2Config(vision_config=TOWER, text_config=text)
    ).eval()
    model.save_pretrained(root)
    processor = transformers.Siglip2ImageProcessor(patch_size=4, max_num_patches=64)
    processor.save_pretrained(root)
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
    enc = create("encoder", "siglip2", pretrained=saved["dir"], num_tokens=16)
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


def test_a_unified_model_takes_a_vpit_step_with_siglip2(saved, tmp_path):
    bb = save_tiny_backbone(tmp_path / "bb", "llama")
    enc = {"name": "siglip2", "kwargs": {"pretrained": saved["dir"], "num_tokens": 4}}
    torch.manual_seed(0)
    model = MetaMorphModel.from_config(tiny_model_config(bb, encoder=enc))
    batch = model.prepare_batch([samples.understanding(size=40), samples.generation(size=40)])
    model.train()
    out = model(**batch)
    assert out.visual_tokens == 4 and torch.isfinite(out.loss) and out.visual_loss > 0
    out.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.projector.parameters())
    assert not any(p.grad is not None for p in model.encoder.parameters())
    loaded = MetaMorphModel.from_pretrained(model.save_pretrained(tmp_path / "ckpt"))
    assert loaded.encoder.max_num_patches == 64
    with torch.no_grad():
        assert torch.equal(model.eval()(**batch).loss, loaded.eval()(**batch).loss)
