"""The timm encoder on CNNs: random ConvNeXt / EfficientNet / RegNet presets at 64x64 pixels,
their weights in a local .safetensors file as timm's Hub repos hold them (classifier included)."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from metamorph_core import create
from metamorph_core.errors import CheckpointError
from metamorph_core.testing import check_encoder, offline_hub, populate_hub_cache

SIZE = {"pretrained_cfg_overlay": {"input_size": (3, 64, 64)}}
# (model, channels of its feature stages, their stride): 64 px -> grids of 64 / stride
STAGES = {
    "convnext_atto": ((40, 80, 160, 320), (4, 8, 16, 32)),
    "efficientnet_b0": ((16, 24, 40, 112, 320), (2, 4, 8, 16, 32)),
}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("timm_cnn")
    files = {}
    for name in STAGES:
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False)  # with its 1000-class classifier
        files[name] = root / f"{name}.safetensors"
        save_file(model.state_dict(), str(files[name]))
    return files


def _encoder(name, weights, **kwargs):
    return create(
        "encoder",
        "timm",
        model_name=name,
        pretrained=str(weights[name]),
        model_kwargs=SIZE,
        **{"num_tokens": 4, **kwargs},
    )


def _reference_map(name, file, stage, pixels):
    """Independent of the encoder: timm's other feature API (``features_only``), weights from
    the same file -> ``(b, c, h, w)``."""
    model = timm.create_model(
        name,
        features_only=True,
        out_indices=(stage,),
        pretrained=True,
        pretrained_cfg_overlay={"file": str(file), **SIZE["pretrained_cfg_overlay"]},
    ).eval()
    with torch.no_grad():
        return model(pixels)[0]


@pytest.mark.parametrize("name", sorted(STAGES))
def test_cnn_passes_the_conformance_suite_and_reads_the_last_stage(name, weights):
    enc = _encoder(name, weights)
    channels, _ = STAGES[name]
    assert (enc.hidden_size, enc.grid, enc.num_tokens) == (channels[-1], (2, 2), 4)
    assert enc.image_size == (64, 64) and enc.num_layers == len(channels)
    pixels = enc.preprocess([torch.rand(3, 80, 70, generator=torch.Generator().manual_seed(0))])
    ref = _reference_map(name, weights[name], len(channels) - 1, pixels)  # (1, c, 2, 2)
    with torch.no_grad():
        tokens = enc(pixels)
    assert torch.allclose(tokens, F.normalize(ref.flatten(2).transpose(1, 2), dim=-1), atol=1e-5)
    check_encoder(enc)


def test_layer_picks_a_stage_counted_as_for_vits(weights):
    name = "convnext_atto"
    channels, strides = STAGES[name]
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    for layer in range(1, len(channels) + 1):
        enc = _encoder(name, weights, layer=layer, num_tokens=None, reduction="none")
        side = 64 // strides[layer - 1]
        assert (enc.hidden_size, enc.grid) == (channels[layer - 1], (side, side))
        assert enc.num_tokens == side * side
        back = _encoder(name, weights, layer=layer - len(channels) - 1, num_tokens=None)
        with torch.no_grad():
            assert torch.equal(enc(pixels), back(pixels))  # layer i == layer i - (n + 1)
    for layer, message in ((0, "0 is out of range"), (5, "5 is out of range"), (-5, "-5 is")):
        with pytest.raises(ValueError, match=rf"{message}.* 4 feature stages.* 1..4 or -4..-1"):
            _encoder(name, weights, layer=layer)


def test_reductions_work_on_the_feature_grid(weights):
    name = "efficientnet_b0"  # stage 4 (stride 16) at 64 px: a 4x4 grid of 112 channels
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    grid = _reference_map(name, weights[name], 3, pixels)  # (2, 112, 4, 4)
    assert grid.shape == (2, 112, 4, 4)

    def tokens(x):  # (b, c, h, w) -> (b, h*w, c), row by row, L2-normalised
        return F.normalize(x.flatten(2).transpose(1, 2), dim=-1)

    expected = {
        "none": tokens(grid),
        "interpolate": tokens(F.interpolate(grid, size=(3, 3), mode="bilinear")),
        "avgpool": tokens(F.adaptive_avg_pool2d(grid, (3, 3))),
    }
    for reduction, want in expected.items():
        n = 16 if reduction == "none" else 9
        enc = _encoder(name, weights, layer=-2, num_tokens=n, reduction=reduction)
        with torch.no_grad():
            assert torch.allclose(enc(pixels), want, atol=1e-5), reduction
    assert not torch.allclose(expected["interpolate"], expected["avgpool"], atol=1e-3)
    with pytest.raises(ValueError, match=r"reduction 'none' keeps 16 tokens .* num_tokens=4"):
        _encoder(name, weights, layer=-2, reduction="none")
    with pytest.raises(ValueError, match="avgpool cannot reduce a 4x4 patch grid to 5x5"):
        _encoder(name, weights, layer=-2, num_tokens=25, reduction="avgpool")
    with pytest.raises(ValueError, match="no prefix .* drop_prefix_tokens=False needs a ViT"):
        _encoder(name, weights, drop_prefix_tokens=False, reduction="none", num_tokens=None)


def test_non_square_images_give_a_non_square_grid(weights):
    wide = {"pretrained_cfg_overlay": {"input_size": (3, 64, 96), "crop_mode": "squash"}}
    kwargs = {"model_name": "convnext_atto", "pretrained": str(weights["convnext_atto"])}
    full = create("encoder", "timm", **kwargs, model_kwargs=wide, num_tokens=None, reduction="none")
    assert (full.image_size, full.grid, full.num_tokens) == ((64, 96), (2, 3), 6)
    small = create("encoder", "timm", **kwargs, model_kwargs=wide, num_tokens=4)
    pixels = full.preprocess([torch.rand(3, 50, 120)])
    with torch.no_grad():
        assert small(pixels).shape == (1, 4, 320)
    with pytest.raises(ValueError, match="centre crops to a non-square size"):
        create(
            "encoder",
            "timm",
            **kwargs,
            model_kwargs={"pretrained_cfg_overlay": {"input_size": (3, 64, 96)}},
        )


@pytest.mark.parametrize("name", sorted(STAGES))
def test_a_unified_model_takes_a_vpit_step_with_a_cnn_encoder(name, weights, vpit_step):
    kwargs = {"model_name": name, "pretrained": str(weights[name]), "model_kwargs": SIZE}
    vpit_step("timm", {**kwargs, "num_tokens": 4})


def test_regnet_and_resnet_stages():
    regnet = create("encoder", "timm", model_name="regnetx_002", model_kwargs=SIZE, seed=0)
    # the default 64 tokens: the last stage's 2x2 grid interpolated up to 8x8
    assert (regnet.hidden_size, regnet.grid, regnet.num_tokens) == (368, (2, 2), 64)
    check_encoder(regnet)
    resnet = create(
        "encoder", "timm", model_name="resnet18", model_kwargs=SIZE, layer=1, num_tokens=16
    )
    assert (resnet.hidden_size, resnet.grid) == (64, (32, 32))  # stage 1 is the stem


def test_timm_weights_come_from_a_local_hub_cache_or_a_clear_error(weights, tmp_path, monkeypatch):
    cache = offline_hub(monkeypatch, tmp_path / "hub")
    repo = timm.models.get_pretrained_cfg_value("convnext_atto", "hf_hub_id")
    with pytest.raises(
        CheckpointError, match=rf"cannot fetch 'convnext_atto'.*'{repo}'.*pretrained="
    ):
        create("encoder", "timm", model_name="convnext_atto", pretrained=True, model_kwargs=SIZE)
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "model.safetensors").write_bytes(weights["convnext_atto"].read_bytes())
    populate_hub_cache(cache, repo, tmp_path / "repo")
    hub = create("encoder", "timm", model_name="convnext_atto", pretrained=True, model_kwargs=SIZE)
    local = _encoder("convnext_atto", weights)
    a, b = hub.state_dict(), local.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class _Classifier(torch.nn.Module):
    """A plain classifier: no feature stages at all."""

    def __init__(self, tokens: bool = False, **_: object) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(3, 2)
        self.feature_info = [{"num_chs": 2, "reduction": 1, "module": "fc"}]
        if tokens:  # intermediates of the wrong shape: (b, n, c) tokens, not maps
            self.forward_intermediates = lambda x, **kw: [self.fc(x.flatten(2).transpose(1, 2))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean((2, 3)))


@timm.models.register_model
def metamorph_test_classifier(pretrained: bool = False, **kwargs: object) -> _Classifier:
    return _Classifier(**kwargs)


@timm.models.register_model
def metamorph_test_token_classifier(pretrained: bool = False, **kwargs: object) -> _Classifier:
    return _Classifier(tokens=True, **kwargs)


def test_models_without_spatial_feature_maps_are_clear_errors():
    with pytest.raises(ValueError, match="'metamorph_test_classifier' .* has no forward_interm"):
        create("encoder", "timm", model_name="metamorph_test_classifier")
    with pytest.raises(ValueError, match=r"gives \(1, 50176, 2\) at stage 1, not a \(b, c, h, w\)"):
        create("encoder", "timm", model_name="metamorph_test_token_classifier")
    # a Swin is made for one input size: images of another give no map
    with pytest.raises(
        ValueError, match=r"'swin_tiny_patch4_window7_224' gave no .* map at stage 4 for 96x96"
    ):
        create(
            "encoder",
            "timm",
            model_name="swin_tiny_patch4_window7_224",
            model_kwargs={**SIZE, "depths": (1, 1, 1, 1), "embed_dim": 16, "num_heads": (1,) * 4},
            image_transform={"size": (96, 96), "mean": (0.5,) * 3, "std": (0.5,) * 3},
        )
