"""siglip, clip and timm encoders on tiny random models saved to disk and loaded by our loaders."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from PIL import Image

from metamorph_core import MetaMorphModel, create
from metamorph_core.errors import CheckpointError
from metamorph_core.testing import check_encoder, samples, save_tiny_backbone, tiny_model_config

transformers.utils.logging.disable_progress_bar()
TOWER = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "image_size": 32,
    "patch_size": 4,
}
TIMM = {
    "model_name": "vit_small_patch16_224",
    "model_kwargs": {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2},
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("encoders")
    torch.manual_seed(0)
    sig = transformers.SiglipModel(
        transformers.SiglipConfig(
            vision_config=TOWER,
            text_config={**TOWER, "vocab_size": 50, "bos_token_id": None, "eos_token_id": None},
        )
    )
    sig.save_pretrained(root / "siglip")
    transformers.SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(
        root / "siglip"
    )
    clip = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**TOWER))
    clip.save_pretrained(root / "clip")
    transformers.CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    ).save_pretrained(root / "clip")
    return {"root": root, "siglip": sig, "clip": clip}


def _reduce(tokens: torch.Tensor, side: int, out: int) -> torch.Tensor:
    """Independent reference: (b, side*side, c) -> bilinear fp32 to out x out -> L2 norm."""
    b, _, c = tokens.shape
    grid = tokens.float().reshape(b, side, side, c).permute(0, 3, 1, 2)
    small = F.interpolate(
        grid, size=(out, out), mode="bilinear", align_corners=False, antialias=False
    )
    return F.normalize(small.permute(0, 2, 3, 1).reshape(b, out * out, c), dim=-1)


def test_siglip_default_is_last_hidden_state_before_post_layernorm(saved):
    enc = create("encoder", "siglip", pretrained=str(saved["root"] / "siglip"), num_tokens=16)
    assert (enc.layer, enc.num_tokens, enc.hidden_size, enc.image_size) == (-1, 16, 32, (32, 32))
    pixels = enc.preprocess([torch.rand(3, 40, 28), torch.rand(3, 32, 32)])
    with torch.no_grad():
        ours = enc(pixels)
        ref = saved["siglip"].vision_model(pixel_values=pixels, output_hidden_states=True)
    assert torch.allclose(ours, _reduce(ref.hidden_states[-1], 8, 4), atol=1e-6)
    assert not torch.allclose(ours, _reduce(ref.last_hidden_state, 8, 4), atol=1e-3)  # post-LN
    check_encoder(enc)


def test_clip_reads_the_penultimate_layer_without_the_class_token(saved):
    enc = create("encoder", "clip", pretrained=str(saved["root"] / "clip"), num_tokens=16)
    assert enc.layer == -2
    pixels = enc.preprocess([torch.rand(3, 32, 48)])
    with torch.no_grad():
        ref = saved["clip"](pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        assert torch.allclose(enc(pixels), _reduce(ref[:, 1:], 8, 4), atol=1e-6)
    check_encoder(enc)


def test_timm_vits_including_the_siglip_family(tmp_path):
    enc = create("encoder", "timm", **TIMM, num_tokens=4, seed=0)
    pixels = enc.preprocess([torch.rand(3, 32, 32)])
    m = enc.model
    with torch.no_grad():  # independent: run the blocks by hand, take the last, drop the class
        x = m.norm_pre(m._pos_embed(m.patch_embed(pixels)))
        for blk in m.blocks:
            x = blk(x)
        assert torch.allclose(enc(pixels), _reduce(x[:, m.num_prefix_tokens :], 4, 2), atol=1e-6)
    check_encoder(enc)
    so400m = create(
        "encoder",
        "timm",
        model_name="vit_so400m_patch14_siglip_384",
        model_kwargs={"img_size": 28, "depth": 1, "embed_dim": 32, "num_heads": 2},
        num_tokens=4,
    )
    check_encoder(so400m)
    # weights round trip through a safetensors file; pickled checkpoints are refused
    enc.save_pretrained(tmp_path)
    again = create("encoder", "timm", **TIMM, num_tokens=4, pretrained=str(tmp_path))
    assert all(
        torch.equal(a, b)
        for a, b in zip(enc.state_dict().values(), again.state_dict().values(), strict=True)
    )
    (tmp_path / "w.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"not a .safetensors file.*nothing is unpickled"):
        create("encoder", "timm", **TIMM, pretrained=str(tmp_path / "w.pth"))


def test_random_init_from_config_and_reduction_options():
    enc = create("encoder", "siglip", config=TOWER, num_tokens=16, seed=3)
    check_encoder(enc)
    pool = create("encoder", "siglip", config=TOWER, num_tokens=16, reduction="avgpool", seed=3)
    full = create(
        "encoder",
        "clip",
        config=TOWER,
        num_tokens=None,
        reduction="none",
        drop_prefix_tokens=False,
        normalize=False,
        seed=3,
    )
    x = torch.rand(2, 3, 32, 32)
    assert pool(x).shape == (2, 16, 32)
    assert full(x).shape == (2, 65, 32) and full.num_tokens == 65  # 8x8 patches + class token
    assert not torch.allclose(full(x).norm(dim=-1), torch.ones(2, 65))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"layer": 4},
            r"layer 4 is out of range; this model has 3 blocks, so layer must be in \[-4, 3\]",
        ),
        ({"num_tokens": 10}, "num_tokens must be a square number"),
        (
            {"num_tokens": 100, "reduction": "avgpool"},
            "avgpool cannot reduce a 8x8 patch grid to 10x10",
        ),
        ({"num_tokens": 16, "reduction": "none"}, "reduction 'none' keeps 64 tokens"),
        ({"drop_prefix_tokens": False}, "keeping prefix .* tokens needs reduction='none'"),
        ({"reduction": "maxpool"}, "unknown reduction 'maxpool'"),
    ],
)
def test_bad_options_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        create("encoder", "clip", config=TOWER, **{"num_tokens": 16, **kwargs})


def test_preprocessing_follows_the_processor_and_reads_anything(saved, tmp_path):
    enc = create("encoder", "clip", pretrained=str(saved["root"] / "clip"), num_tokens=16)
    t = enc.transform
    assert (t.resize, t.center_crop, t.interpolation, t.size) == (32, True, "bicubic", (32, 32))
    smooth = torch.linspace(0, 1, 48)[None, :, None].expand(3, 48, 64).contiguous()
    hf = transformers.CLIPImageProcessor.from_pretrained(saved["root"] / "clip")
    ref = hf(images=[(smooth.permute(1, 2, 0).numpy() * 255).astype(np.uint8)], return_tensors="pt")
    ours = enc.preprocess([smooth])
    assert (ours - ref["pixel_values"]).abs().mean() < 0.02  # torch vs PIL filters
    rgba = Image.fromarray(
        (np.random.default_rng(0).random((20, 30, 4)) * 255).astype(np.uint8), "RGBA"
    )
    path = tmp_path / "ok.png"
    rgba.save(path)
    batch = enc.preprocess(
        [path, rgba, rgba.convert("L"), rgba.convert("P"), np.asarray(rgba)[..., :3]]
    )
    assert batch.shape == (5, 3, 32, 32)
    assert torch.allclose(batch[0], batch[1]) and torch.allclose(batch[1], batch[4])
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match="cannot read image file '.*broken.png'"):
        enc.preprocess([path, tmp_path / "broken.png"])
    with pytest.raises(ValueError, match=r"image 1: expected \(c, h, w\) with 1, 3 or 4 channels"):
        enc.preprocess([torch.rand(3, 8, 8), torch.rand(2, 8, 8)])


def test_unified_model_with_siglip_saves_encoder_in_a_subfolder(saved, tmp_path):
    bb = save_tiny_backbone(tmp_path / "bb", "qwen3")
    cfg = tiny_model_config(
        bb,
        encoder={
            "name": "siglip",
            "kwargs": {"pretrained": str(saved["root"] / "siglip"), "num_tokens": 16},
        },
    )
    model = MetaMorphModel.from_config(cfg)
    batch = model.prepare_batch([samples.understanding(size=32), samples.generation(size=32)])
    out = model(**batch)
    out.loss.backward()
    assert out.visual_tokens == 16 and not any(
        p.grad is not None for p in model.encoder.parameters()
    )
    path = model.save_pretrained(tmp_path / "ckpt")
    meta = json.loads((path / "config.json").read_text())["components"]["encoder"]
    assert meta["subfolder"] == "encoder" and meta["load_kwargs"]["num_tokens"] == 16
    loaded = MetaMorphModel.from_pretrained(path)
    a, b = model.state_dict(), loaded.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        assert torch.equal(model.eval()(**batch).loss, loaded.eval()(**batch).loss)


def test_the_papers_geometry_729_patches_to_64_tokens():
    big = {**TOWER, "image_size": 384, "patch_size": 14, "num_hidden_layers": 1}
    enc = create("encoder", "siglip", config=big, seed=0)  # num_tokens defaults to 64
    assert enc.grid == (27, 27) and enc.num_tokens == 64
    pixels = enc.preprocess([torch.rand(3, 300, 500)])
    with torch.no_grad():
        ref = enc.model(pixel_values=pixels, output_hidden_states=True).hidden_states[-1]
        assert torch.allclose(enc(pixels), _reduce(ref, 27, 8), atol=1e-6)


def test_preprocessing_matches_transformers_and_timm(saved):
    rng = np.random.default_rng(0)
    photo = Image.fromarray((rng.random((30, 50, 3)) * 255).astype(np.uint8)).resize((300, 500))
    sig = create("encoder", "siglip", pretrained=str(saved["root"] / "siglip"), num_tokens=16)
    hf = transformers.SiglipImageProcessor.from_pretrained(saved["root"] / "siglip")
    diff = sig.preprocess([photo]) - hf(images=[photo], return_tensors="pt")["pixel_values"]
    assert diff.abs().mean() < 0.02  # squash resize; torch vs PIL filters
    import timm

    enc = create("encoder", "timm", **TIMM, num_tokens=4)
    assert enc.transform.center_crop and isinstance(enc.transform.resize, int)
    cfg = timm.data.resolve_model_data_config(enc.model)
    cfg["input_size"] = (3, 32, 32)
    ref = timm.data.create_transform(**cfg)(photo)
    assert (enc.preprocess([photo])[0] - ref).abs().mean() < 0.05


def test_unsafe_or_mismatched_checkpoints_are_refused(saved, tmp_path):
    clip = saved["root"] / "clip"
    with pytest.raises(CheckpointError, match="holds a 'clip_vision_model' model, not siglip"):
        create("encoder", "siglip", pretrained=str(clip))
    pickled = tmp_path / "pickled"
    saved["clip"].save_pretrained(pickled)
    from safetensors.torch import load_file

    weights = pickled / "model.safetensors"
    torch.save(load_file(str(weights)), pickled / "pytorch_model.bin")  # a pickle-only checkpoint
    weights.unlink()
    with pytest.raises(CheckpointError, match="safetensors only"):
        create("encoder", "clip", pretrained=str(pickled))
    with pytest.raises(
        ValueError, match="layer 0 .* not available from timm; use a block output: 1..2"
    ):
        create("encoder", "timm", **TIMM, layer=0)


def test_encoder_dtype_survives_a_unified_checkpoint(saved, tmp_path):
    bb = save_tiny_backbone(tmp_path / "bb", "llama")
    cfg = tiny_model_config(bb, encoder={"name": "timm", "kwargs": {**TIMM, "num_tokens": 4}})
    model = MetaMorphModel.from_config(cfg)
    model.encoder.to(torch.bfloat16)
    loaded = MetaMorphModel.from_pretrained(model.save_pretrained(tmp_path / "ckpt"))
    assert next(loaded.encoder.parameters()).dtype == torch.bfloat16
    a, b = model.encoder.state_dict(), loaded.encoder.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_pixel_value_ranges():
    from metamorph_core.vision import to_tensor

    eight = torch.tensor([[0, 128, 255]], dtype=torch.int64)
    sixteen = torch.tensor([[0, 32768, 65535]], dtype=torch.int32)
    assert torch.allclose(to_tensor(eight)[0], torch.tensor([[0.0, 128 / 255, 1.0]]))
    assert torch.allclose(to_tensor(sixteen)[0], torch.tensor([[0.0, 32768 / 65535, 1.0]]))
    with pytest.raises(
        ValueError, match=r"image 3: float pixels must lie in \[0, 1\], got \[0, 255\]"
    ):
        to_tensor(np.array([[0.0, 255.0]]), index=3)


def test_center_subtracts_the_saved_token_mean(tmp_path):
    from metamorph_core.testing import build_tiny_tokenizer
    from metamorph_encoders.base import token_mean
    from metamorph_encoders.pretrain import build_siglip, save_siglip, small_siglip_config

    tok = build_tiny_tokenizer()
    save_siglip(build_siglip(small_siglip_config(len(tok), image_size=16)), tok, tmp_path / "s")
    images = torch.rand(6, 3, 16, 16)
    raw = create("encoder", "siglip", pretrained=str(tmp_path / "s"), num_tokens=4, normalize=False)
    mean = token_mean(raw, images, tmp_path / "mean.safetensors")
    centred = create(
        "encoder",
        "siglip",
        pretrained=str(tmp_path / "s"),
        num_tokens=4,
        normalize=False,
        center=str(mean),
    )
    with torch.no_grad():
        a, b = raw(raw.preprocess(images)), centred(centred.preprocess(images))
    assert torch.allclose(b, a - a.mean(0), atol=1e-5)
    assert b.mean(0).abs().max() < 1e-5 and a.mean(0).abs().max() > 1e-3
    with pytest.raises(ValueError, match=r"must hold 'token_mean' of shape \(64, 64\)"):
        create("encoder", "siglip", pretrained=str(tmp_path / "s"), center=str(mean))
    # one mean over every position: what the position embeddings add to each stays
    one = token_mean(raw, images, tmp_path / "one.safetensors", per_token=False)
    centred = create(
        "encoder", "siglip", pretrained=str(tmp_path / "s"), num_tokens=4, normalize=False,
        center=str(one),
    )  # fmt: skip
    with torch.no_grad():
        c = centred(centred.preprocess(images))
    assert torch.allclose(c, a - a.mean((0, 1)), atol=1e-5)
    assert c.mean((0, 1)).abs().max() < 1e-5 and c.mean(0).abs().max() > 1e-3
    with pytest.raises(ValueError, match="normalize=False"):
        token_mean(
            create("encoder", "siglip", pretrained=str(tmp_path / "s")), images, tmp_path / "x"
        )
