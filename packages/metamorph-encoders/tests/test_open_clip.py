"""The open_clip encoder on tiny random open_clip models (a ViT tower, a timm ConvNeXt tower and a
ModifiedResNet), each saved whole (text tower included) as safetensors; the reference tokens are
read with forward hooks from the same file loaded by open_clip's own loader."""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from metamorph_core import create
from metamorph_core.errors import CheckpointError
from metamorph_core.testing import check_encoder, offline_hub, populate_hub_cache
from metamorph_encoders.transforms import ImageTransform

# CI installs the extra, so a missing open_clip fails there instead of skipping
open_clip = importlib.import_module("open_clip") if os.environ.get("CI") else None
open_clip = open_clip or pytest.importorskip("open_clip")

TEXT = {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1}
# open_clip model configs: a 4x4 grid of 8-px patches; convnext_atto at 64 px (grids 16..2)
CONFIGS = {
    "vit": {
        "embed_dim": 16,
        "vision_cfg": {
            "image_size": 32,
            "patch_size": 8,
            "layers": 2,
            "width": 32,
            "head_width": 16,
        },
        "text_cfg": TEXT,
    },
    "convnext": {  # as open_clip's convnext_* configs, on timm's smallest ConvNeXt
        "embed_dim": 16,
        "vision_cfg": {
            "timm_model_name": "convnext_atto",
            "timm_pool": "",
            "timm_proj": "linear",
            "image_size": 64,
        },
        "text_cfg": TEXT,
    },
    "resnet": {
        "embed_dim": 16,
        "vision_cfg": {"layers": [1, 1, 1, 1], "width": 16, "image_size": 64},
        "text_cfg": TEXT,
    },
}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """kind -> a .safetensors file of a whole random open_clip CLIP model."""
    root = tmp_path_factory.mktemp("open_clip")
    files = {}
    for kind, cfg in CONFIGS.items():
        torch.manual_seed(0)
        files[kind] = root / f"{kind}.safetensors"
        save_file(open_clip.CLIP(**cfg).state_dict(), str(files[kind]))
    return files


def _encoder(kind, weights, **kwargs):
    return create(
        "encoder",
        "open_clip",
        model_cfg=CONFIGS[kind],
        pretrained=str(weights[kind]),
        **{"num_tokens": 4, **kwargs},
    )


def _hooked(kind, file, module_name, pixels):
    """The output of ``module_name`` in the image tower of open_clip's own model, loaded with
    open_clip's loader from ``file``, for ``pixels``."""
    model = open_clip.CLIP(**CONFIGS[kind]).eval()
    open_clip.load_checkpoint(model, str(file))
    seen = []
    handle = model.visual.get_submodule(module_name).register_forward_hook(
        lambda _m, _i, out: seen.append(out)
    )
    with torch.no_grad():
        model.encode_image(pixels)
    handle.remove()
    return seen[0]


def _tokens(feature_map):  # (b, c, h, w) -> (b, h*w, c)
    return feature_map.flatten(2).transpose(1, 2)


def test_vit_tower_reads_block_outputs_before_ln_post(weights):
    enc = _encoder("vit", weights)
    assert (enc.hidden_size, enc.grid, enc.num_tokens, enc.num_layers) == (32, (4, 4), 4, 2)
    assert enc.image_size == (32, 32) and enc.num_prefix_tokens == 1
    pixels = enc.preprocess([torch.rand(3, 40, 50, generator=torch.Generator().manual_seed(0))])
    for layer, block in ((-1, "transformer.resblocks.1"), (1, "transformer.resblocks.0")):
        ref = _hooked("vit", weights["vit"], block, pixels)  # (1, 1 + 16, 32): class token first
        full = _encoder(
            "vit",
            weights,
            layer=layer,
            num_tokens=None,
            reduction="none",
            normalize=False,
            drop_prefix_tokens=False,
        )
        with torch.no_grad():
            assert torch.allclose(full(pixels), ref, atol=1e-5), layer
    grid = ref[:, 1:].transpose(1, 2).reshape(1, 32, 4, 4)  # layer 1's patch tokens
    want = F.normalize(_tokens(F.interpolate(grid, size=(2, 2), mode="bilinear")), dim=-1)
    with torch.no_grad():
        assert torch.allclose(_encoder("vit", weights, layer=1)(pixels), want, atol=1e-5)
    check_encoder(enc)
    with pytest.raises(ValueError, match=r"layer 0 \(the embeddings\) is not offered.* 1..2"):
        _encoder("vit", weights, layer=0)


def test_timm_convnext_tower_reads_its_trunks_feature_maps(weights):
    enc = _encoder("convnext", weights)
    assert (enc.hidden_size, enc.grid, enc.num_layers, enc.image_size) == (320, (2, 2), 4, (64, 64))
    pixels = enc.preprocess([torch.rand(3, 70, 64, generator=torch.Generator().manual_seed(1))])
    ref = _hooked("convnext", weights["convnext"], "trunk.stages.3", pixels)  # (1, 320, 2, 2)
    with torch.no_grad():
        assert torch.allclose(enc(pixels), F.normalize(_tokens(ref), dim=-1), atol=1e-5)
    ref = _hooked("convnext", weights["convnext"], "trunk.stages.1", pixels)  # (1, 80, 8, 8)
    for reduction, want in (
        ("none", ref),
        ("avgpool", F.adaptive_avg_pool2d(ref, (4, 4))),
        ("interpolate", F.interpolate(ref, size=(4, 4), mode="bilinear")),
    ):
        n = 64 if reduction == "none" else 16
        stage = _encoder("convnext", weights, layer=2, num_tokens=n, reduction=reduction)
        with torch.no_grad():
            assert torch.allclose(stage(pixels), F.normalize(_tokens(want), dim=-1), atol=1e-5)
    check_encoder(enc)
    with pytest.raises(ValueError, match=r"layer 5 is out of range.* 4 feature stages"):
        _encoder("convnext", weights, layer=5)


def test_resnet_tower_reads_its_stages_before_the_attention_pool(weights):
    enc = _encoder("resnet", weights)
    assert (enc.hidden_size, enc.grid, enc.num_layers) == (512, (2, 2), 5)
    pixels = enc.preprocess([torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(2))])
    ref = _hooked("resnet", weights["resnet"], "layer4", pixels)  # (1, 512, 2, 2)
    with torch.no_grad():
        assert torch.allclose(enc(pixels), F.normalize(_tokens(ref), dim=-1), atol=1e-5)
    stem = _encoder("resnet", weights, layer=1, num_tokens=None, reduction="none")
    assert (stem.hidden_size, stem.grid) == (16, (16, 16))  # the stem: width 16, stride 4
    check_encoder(enc)
    with pytest.raises(ValueError, match="no prefix .* drop_prefix_tokens=False needs a ViT"):
        _encoder("resnet", weights, drop_prefix_tokens=False, reduction="none", num_tokens=None)


def test_preprocessing_follows_open_clips_eval_transform():
    from open_clip.transform import PreprocessCfg, image_transform_v2

    image = Image.fromarray(
        (torch.rand(60, 90, 3, generator=torch.Generator().manual_seed(3)) * 255).byte().numpy()
    )
    for mode in ("shortest", "squash"):
        cfg = {"size": 32, "mean": (0.5,) * 3, "std": (0.25,) * 3, "resize_mode": mode}
        ours = ImageTransform.from_open_clip(cfg)([image])[0]
        theirs = image_transform_v2(PreprocessCfg(**cfg), is_train=False)(image)
        assert ours.shape == theirs.shape == (3, 32, 32)
        # torch's antialiased bicubic against PIL's: a few levels of 255 apart
        assert (ours - theirs).abs().mean() < 0.05, mode
    with pytest.raises(ValueError, match="resize_mode 'longest' is not supported"):
        ImageTransform.from_open_clip({**cfg, "resize_mode": "longest"})


@pytest.mark.parametrize("kind", ["vit", "convnext"])
def test_a_unified_model_takes_a_vpit_step_with_an_open_clip_encoder(kind, weights, vpit_step):
    vpit_step(
        "open_clip", {"model_cfg": CONFIGS[kind], "pretrained": str(weights[kind]), "num_tokens": 4}
    )


def test_a_hub_repo_loads_from_the_local_cache_with_its_own_config(weights, tmp_path, monkeypatch):
    cache = offline_hub(monkeypatch, tmp_path / "hub")
    with pytest.raises(
        CheckpointError, match=r"'org/tiny-clip'.*Hub cache .*\(hf download org/tiny-clip\)"
    ):
        create("encoder", "open_clip", pretrained="org/tiny-clip")
    repo = tmp_path / "repo"
    repo.mkdir()
    preprocess = {
        "mean": [0.5] * 3,
        "std": [0.5] * 3,
        "interpolation": "bilinear",
        "resize_mode": "squash",
    }
    config = {"model_cfg": CONFIGS["vit"], "preprocess_cfg": preprocess}
    (repo / "open_clip_config.json").write_text(json.dumps(config))
    (repo / "open_clip_model.safetensors").write_bytes(weights["vit"].read_bytes())
    # timm's Hub repos also hold the trunk alone, in timm's layout, as model.safetensors
    save_file({"patch_embed.proj.weight": torch.zeros(1)}, str(repo / "model.safetensors"))
    populate_hub_cache(cache, "org/tiny-clip", repo)
    hub = create("encoder", "open_clip", pretrained="org/tiny-clip", num_tokens=4)
    t = hub.transform
    assert (t.size, t.resize, t.center_crop, t.interpolation, t.mean) == (
        (32, 32),
        None,
        False,
        "bilinear",
        (0.5,) * 3,
    )
    local = _encoder("vit", weights)
    pixels = local.preprocess([torch.rand(3, 32, 32)])
    with torch.no_grad():
        assert torch.equal(hub(pixels), local(pixels))


def test_a_pretrained_tag_reads_the_hub_repo_open_clip_names(tmp_path, monkeypatch, caplog):
    cache = offline_hub(monkeypatch, tmp_path / "hub")
    tiny = {"vision_cfg": CONFIGS["vit"]["vision_cfg"]}  # ViT-B-32's embed_dim, a tiny tower
    kwargs = {"model_name": "ViT-B-32", "pretrained": "laion2b_s34b_b79k", **tiny, "num_tokens": 4}
    repo_id = "laion/CLIP-ViT-B-32-laion2B-s34B-b79K"
    with pytest.raises(CheckpointError, match=rf"tag 'laion2b_s34b_b79k' .*'{repo_id}'"):
        create("encoder", "open_clip", **kwargs)
    torch.manual_seed(0)
    model = open_clip.CLIP(embed_dim=512, vision_cfg=tiny["vision_cfg"], text_cfg=TEXT)
    (tmp_path / "repo").mkdir()
    save_file(model.state_dict(), str(tmp_path / "repo" / "open_clip_model.safetensors"))
    populate_hub_cache(cache, repo_id, tmp_path / "repo")
    enc = create("encoder", "open_clip", **kwargs)
    assert enc.transform.mean == open_clip.OPENAI_DATASET_MEAN and enc.transform.resize == 32
    ref = dict(model.visual.state_dict())
    assert all(torch.equal(v, ref[k]) for k, v in enc.model.state_dict().items())
    # OpenAI's weights were trained with QuickGELU, which ViT-B-32 (unlike ViT-B-32-quickgelu)
    # does not build: built as asked, with open_clip's warning
    populate_hub_cache(cache, "timm/vit_base_patch32_clip_224.openai", tmp_path / "repo")
    with caplog.at_level(logging.WARNING, logger="metamorph"):
        create("encoder", "open_clip", **{**kwargs, "pretrained": "openai"})
    assert "trained with quick_gelu=True but 'ViT-B-32' builds quick_gelu=False" in caplog.text


def test_clear_errors(weights, tmp_path, monkeypatch):
    base = {"model_cfg": CONFIGS["vit"]}
    (tmp_path / "w.pt").write_bytes(b"pickle")
    (tmp_path / "cut.safetensors").write_bytes(weights["vit"].read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="'.*cut.safetensors' is not a readable safetensors"):
        create("encoder", "open_clip", **base, pretrained=str(tmp_path / "cut.safetensors"))
    with pytest.raises(CheckpointError, match=r"'.*w.pt' is not a .safetensors file.* unpickled"):
        create("encoder", "open_clip", **base, pretrained=str(tmp_path / "w.pt"))
    with pytest.raises(
        CheckpointError, match=r"open_clip_model.safetensors.*pickled weights \['w.pt'\]"
    ):
        create("encoder", "open_clip", **base, pretrained=str(tmp_path))
    with pytest.raises(
        CheckpointError,
        match=r"not hold the 'model_cfg' tower: it lacks \['class_emb.* has \['head.proj",
    ):
        create("encoder", "open_clip", **base, pretrained=str(weights["convnext"]))
    with pytest.raises(CheckpointError, match="do not fit the 'RN50' tower"):
        create("encoder", "open_clip", model_name="RN50", pretrained=str(weights["resnet"]))
    with pytest.raises(ValueError, match=r"unknown model 'ViT-X'; see open_clip.list_models\(\)"):
        create("encoder", "open_clip", model_name="ViT-X")
    with pytest.raises(ValueError, match="pass pretrained='org/name' instead"):
        create("encoder", "open_clip", model_name="hf-hub:org/name")
    with pytest.raises(ValueError, match="needs model_name=.* or pretrained= a directory"):
        create("encoder", "open_clip", pretrained=str(weights["vit"]))
    with pytest.raises(ValueError, match=r"unknown fields \['patch'\]"):
        create("encoder", "open_clip", **base, vision_cfg={"patch": 4})
    with pytest.raises(ValueError, match="gives 48x48 images but the 'model_cfg' tower is built"):
        create(
            "encoder",
            "open_clip",
            **base,
            image_transform={"size": (48, 48), "mean": (0.5,) * 3, "std": (0.5,) * 3},
        )
    monkeypatch.setitem(sys.modules, "open_clip", None)  # as if not installed
    with pytest.raises(ImportError, match=r"pip install 'metamorph-encoders\[open_clip\]'"):
        create("encoder", "open_clip", **base)
