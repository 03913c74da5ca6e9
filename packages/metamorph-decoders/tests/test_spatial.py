"""``sd-unet``'s spatial conditioning: each token of a square grid laid over its own patch of
the UNet's input (concatenated channels), dropped together with the context."""

from __future__ import annotations

import pytest
import torch

from metamorph_core import create
from metamorph_core.errors import CheckpointError
from metamorph_decoders.testing import tiny_unet_config

K = 4  # spatial channels


def spatial_decoder(**kw):
    unet = tiny_unet_config(in_channels=3 + K)
    return create(
        "decoder",
        "sd-unet",
        unet_config=unet,
        token_dim=24,
        num_tokens=4,  # a 2x2 grid over the 16x16 sample: 8x8 pixels a token
        adapter={"name": "mlp", "kwargs": {"hidden_dims": [48]}},
        spatial_channels=K,
        scheduler_config={"num_train_timesteps": 100, "clip_sample": False},
        seed=0,
        **kw,
    )


def data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 4, 24, generator=g), torch.rand(4, 3, 16, 16, generator=g)


def _record_inputs(dec, seen: list):
    return dec.unet.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(args[0].clone()), with_kwargs=True
    )


def test_each_token_covers_its_own_patch_row_major():
    dec = spatial_decoder()
    tokens, _ = data()
    grid = dec.spatial_map(tokens)
    assert grid.shape == (4, K, 16, 16)
    proj = tokens @ dec.spatial.weight.T  # (b, n, K)
    for n, (rows, cols) in enumerate(
        [(slice(0, 8), slice(0, 8)), (slice(0, 8), slice(8, 16))]
        + [(slice(8, 16), slice(0, 8)), (slice(8, 16), slice(8, 16))]
    ):
        patch = grid[:, :, rows, cols]
        assert torch.allclose(patch, proj[:, n, :, None, None].expand_as(patch))
    changed = tokens.clone()
    changed[:, 3] += 1.0  # the bottom-right token moves only the bottom-right patch
    diff = (dec.spatial_map(changed) - grid).abs().sum(dim=(0, 1))
    assert diff[8:, 8:].min() > 0 and diff[:8].max() == 0 and diff[:, :8].max() == 0


def test_a_grid_that_does_not_divide_the_sample_is_laid_nearest():
    dec = create(
        "decoder",
        "sd-unet",
        unet_config=tiny_unet_config(in_channels=3 + K),
        token_dim=24,
        num_tokens=9,  # 3x3 over 16x16: patches of 5, 5 and 6 pixels
        spatial_channels=K,
    )
    tokens = torch.randn(2, 9, 24)
    grid = dec.spatial_map(tokens)
    proj = tokens @ dec.spatial.weight.T
    rows = [min(i * 3 // 16, 2) for i in range(16)]
    expected = torch.stack(
        [torch.stack([proj[:, 3 * r + c] for c in rows], -1) for r in rows], -2
    )  # (b, K, 16, 16)
    assert torch.allclose(grid, expected)


def test_unet_sees_the_map_and_dropout_and_guidance_zero_it():
    dec = spatial_decoder(cond_dropout=1.0)
    tokens, pixels = data()
    seen = []
    hook = _record_inputs(dec, seen)
    dec.train()
    dec.loss(tokens, pixels)  # every sample dropped
    dec.eval()
    dec.loss(tokens, pixels)  # no dropout in eval
    dec.decode(tokens, steps=1, guidance_scale=3.0, seed=0)  # [uncond, cond]
    hook.remove()
    dropped, kept, guided = seen
    assert dropped.shape == (4, 3 + K, 16, 16)
    assert not dropped[:, 3:].any()
    assert torch.allclose(kept[:, 3:], dec.spatial_map(tokens))
    assert not guided[:4, 3:].any()
    assert torch.allclose(guided[4:, 3:], dec.spatial_map(tokens))


def test_trains_saves_and_reloads(tmp_path):
    dec = spatial_decoder(cond_dropout=0.2)
    tokens, pixels = data()

    def loss():
        with torch.no_grad():
            return dec.eval().loss(tokens, pixels, generator=torch.Generator().manual_seed(1))

    before = loss().item()
    opt = torch.optim.AdamW(dec.parameters(), lr=2e-3)
    start = dec.spatial.weight.detach().clone()
    torch.manual_seed(0)
    for _ in range(40):
        dec.training_step(tokens, pixels, opt)
    assert loss().item() < 0.8 * before
    assert not torch.equal(dec.spatial.weight, start)  # the projection is trained too
    dec.save_pretrained(tmp_path / "dec")
    again = create("decoder", "sd-unet", pretrained=str(tmp_path / "dec"))
    assert again.settings() == dec.settings() and again.spatial_channels == K
    assert torch.equal(again.spatial.weight, dec.spatial.weight)
    assert torch.equal(dec.decode(tokens, steps=2, seed=3), again.decode(tokens, steps=2, seed=3))
    with pytest.raises(CheckpointError, match="spatial_channels=4 but spatial_channels=0"):
        create("decoder", "sd-unet", pretrained=str(tmp_path / "dec"), spatial_channels=0)


def test_detail_paints_each_tokens_own_pattern_over_its_patch():
    d = 8  # a 2x2 grid of 8x8 patterns is exactly the 16x16 sample: no resizing
    dec = spatial_decoder(spatial_detail=d)
    assert dec.spatial.weight.shape == (K * d * d, 24)
    tokens, _ = data()
    grid = dec.spatial_map(tokens)
    assert grid.shape == (4, K, 16, 16)
    proj = (tokens @ dec.spatial.weight.T).reshape(4, 4, K, d, d)  # (b, n, K, d, d)
    for n in range(4):
        r, c = divmod(n, 2)
        assert torch.allclose(grid[:, :, r * d : (r + 1) * d, c * d : (c + 1) * d], proj[:, n])
    # a pattern, not a flat patch: pixels of one patch differ
    assert grid[:, :, :8, :8].flatten(2).std(-1).min() > 0


def test_detail_resized_to_the_sample_stays_local():
    dec = create(
        "decoder",
        "sd-unet",
        unet_config=tiny_unet_config(in_channels=3 + K),
        token_dim=24,
        num_tokens=9,  # 3x3 tokens of 6x6 patterns: an 18x18 map resized to 16x16
        spatial_channels=K,
        spatial_detail=6,
    )
    tokens = torch.randn(2, 9, 24)
    grid = dec.spatial_map(tokens)
    assert grid.shape == (2, K, 16, 16)
    changed = tokens.clone()
    changed[:, 0] += 1.0  # the top-left token: its patch and at most a pixel of bilinear bleed
    diff = (dec.spatial_map(changed) - grid).abs().sum(dim=(0, 1))
    assert diff[:5, :5].min() > 0
    assert diff[7:].max() == 0 and diff[:, 7:].max() == 0


def test_detail_is_saved_and_checked_on_reload(tmp_path):
    dec = spatial_decoder(spatial_detail=3)
    dec.save_pretrained(tmp_path / "dec")
    again = create("decoder", "sd-unet", pretrained=str(tmp_path / "dec"))
    assert again.spatial_detail == 3 and again.settings() == dec.settings()
    assert torch.equal(again.spatial.weight, dec.spatial.weight)
    with pytest.raises(CheckpointError, match="spatial_detail=3 but spatial_detail=1"):
        create("decoder", "sd-unet", pretrained=str(tmp_path / "dec"), spatial_detail=1)


def test_a_hidden_layer_makes_each_tokens_pattern_non_linear_and_local(tmp_path):
    d, h = 8, 32
    dec = spatial_decoder(spatial_detail=d, spatial_hidden=h)
    assert dec.spatial.weight.shape == (K * d * d, h)
    tokens, _ = data()
    grid = dec.spatial_map(tokens)
    assert grid.shape == (4, K, 16, 16)
    hidden = torch.nn.functional.gelu(
        tokens @ dec.spatial.hidden[0].weight.T + dec.spatial.hidden[0].bias
    )
    proj = (hidden @ dec.spatial.weight.T).reshape(4, 4, K, d, d)
    assert torch.allclose(grid[:, :, :d, :d], proj[:, 0], atol=1e-6)
    assert not torch.allclose(dec.spatial_map(2 * tokens), 2 * grid, atol=1e-3)  # not linear
    changed = tokens.clone()
    changed[:, 3] += 1.0  # the bottom-right token moves only the bottom-right patch
    diff = (dec.spatial_map(changed) - grid).abs().sum(dim=(0, 1))
    assert diff[8:, 8:].min() > 0 and diff[:8].max() == 0 and diff[:, :8].max() == 0
    dec.save_pretrained(tmp_path / "dec")
    again = create("decoder", "sd-unet", pretrained=str(tmp_path / "dec"))
    assert again.spatial_hidden == h and torch.equal(again.spatial_map(tokens), grid)
    with pytest.raises(CheckpointError, match="spatial_hidden=32 but spatial_hidden=0"):
        create("decoder", "sd-unet", pretrained=str(tmp_path / "dec"), spatial_hidden=0)


def test_a_decoder_saved_before_spatial_detail_loads_flat(tmp_path):
    import json

    dec = spatial_decoder()
    dec.save_pretrained(tmp_path / "dec")
    path = tmp_path / "dec" / "config.json"
    config = json.loads(path.read_text())
    del config["spatial_detail"]  # as written before the option existed
    path.write_text(json.dumps(config))
    again = create("decoder", "sd-unet", pretrained=str(tmp_path / "dec"))
    assert again.spatial_detail == 1
    tokens, _ = data()
    assert torch.equal(again.spatial_map(tokens), dec.spatial_map(tokens))


@pytest.mark.parametrize(
    "spatial, detail, message",
    [
        (K, 0, "spatial_detail must be >= 1"),
        (0, 2, r"spatial_detail=2 shapes the spatial conditioning map, which is off"),
    ],
)
def test_bad_detail_is_named(spatial, detail, message):
    with pytest.raises(ValueError, match=message):
        create(
            "decoder",
            "sd-unet",
            unet_config=tiny_unet_config(in_channels=3 + spatial),
            token_dim=24,
            num_tokens=4,
            spatial_channels=spatial,
            spatial_detail=detail,
        )


@pytest.mark.parametrize(
    "in_channels, num_tokens, spatial, message",
    [
        (3 + K, 5, K, "square grid of tokens, but num_tokens=5"),
        (3, 4, K, r"7 input channels \(RGB \+ 4 spatial_channels\)"),
        (3, 4, -1, "spatial_channels must be >= 0"),
    ],
)
def test_bad_settings_are_named(in_channels, num_tokens, spatial, message):
    with pytest.raises(ValueError, match=message):
        create(
            "decoder",
            "sd-unet",
            unet_config=tiny_unet_config(in_channels=in_channels),
            token_dim=24,
            num_tokens=num_tokens,
            spatial_channels=spatial,
        )


def test_a_pretrained_unet_is_widened_with_zero_weights(tmp_path, caplog):
    from diffusers import DDPMScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    base = UNet2DConditionModel(**tiny_unet_config())
    base.save_pretrained(tmp_path / "sd" / "unet")
    DDPMScheduler(num_train_timesteps=100).save_pretrained(tmp_path / "sd" / "scheduler")
    with caplog.at_level("WARNING", logger="metamorph"):
        dec = create(
            "decoder",
            "sd-unet",
            pretrained=str(tmp_path / "sd"),
            token_dim=24,
            num_tokens=4,
            adapter={"name": "mlp", "kwargs": {"hidden_dims": [48], "out_dim": 32}},
            spatial_channels=K,
        )
    assert "conv_in widened 3 -> 7" in caplog.text
    assert dec.unet.config.in_channels == 3 + K
    x, ctx = torch.randn(2, 3, 16, 16), torch.randn(2, 4, 32)
    spatial = dec.spatial_map(torch.randn(2, 4, 24))
    with torch.no_grad():  # the new channels enter with zero weights: the same function
        widened = dec.unet(torch.cat([x, spatial], 1), 5, encoder_hidden_states=ctx).sample
        assert torch.allclose(widened, base(x, 5, encoder_hidden_states=ctx).sample, atol=1e-6)
    dec.save_pretrained(tmp_path / "dec")  # saved widened: reloads without widening again
    again = create("decoder", "sd-unet", pretrained=str(tmp_path / "dec"))
    assert again.unet.config.in_channels == 3 + K
    assert torch.equal(again.unet.conv_in.weight, dec.unet.conv_in.weight)
