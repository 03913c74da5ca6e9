"""``sd-unet`` option ``patch_size``: the UNet denoises p x p patches folded into channels; the
diffusion process itself (noise, targets, images) is the pixel-space one, rearranged."""

from __future__ import annotations

import pytest
import torch

from metamorph_core import create
from metamorph_decoders.testing import tiny_unet_config, tiny_vae_config

P = 2


def patched_decoder(spatial: int = 0, **kw):
    # a 16x16 image is an 8x8 sample of 12 channels at p=2
    unet = tiny_unet_config(sample_size=8, in_channels=3 * P * P + spatial, out_channels=3 * P * P)
    return create(
        "decoder",
        "sd-unet",
        unet_config=unet,
        token_dim=24,
        num_tokens=4,
        adapter={"name": "mlp", "kwargs": {"hidden_dims": [48]}},
        spatial_channels=spatial,
        patch_size=P,
        prediction_type="sample",
        scheduler_config={"num_train_timesteps": 100, "clip_sample": False},
        seed=0,
        **kw,
    )


def data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 4, 24, generator=g), torch.rand(4, 3, 16, 16, generator=g)


def test_images_keep_their_size_and_the_unet_sees_folded_patches():
    dec = patched_decoder(spatial=4)
    tokens, pixels = data()
    assert dec.image_size == (16, 16)
    seen = []
    hook = dec.unet.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    with torch.no_grad():
        images = dec.decode(tokens, steps=2, guidance_scale=1.0, seed=0)
        dec.eval()
        dec.loss(tokens, pixels, generator=torch.Generator().manual_seed(1))
    hook.remove()
    assert images.shape == (4, 3, 16, 16) and images.min() >= 0 and images.max() <= 1
    assert all(x.shape == (4, 3 * P * P + 4, 8, 8) for x in seen)


def test_loss_is_the_pixel_space_loss_rearranged():
    """With the UNet's output replaced by the folded clean image's negation, the x0 loss is
    exactly 4 * mean(x0^2) in pixel space: folding lost and moved no value."""
    dec = patched_decoder().eval()
    tokens, pixels = data()
    x0 = pixels * 2 - 1
    folded = torch.nn.functional.pixel_unshuffle(x0, P)
    hook = dec.unet.register_forward_hook(lambda m, i, o: type(o)(sample=-folded))
    with torch.no_grad():
        loss = dec.loss(tokens, pixels, generator=torch.Generator().manual_seed(3)).item()
    hook.remove()
    assert loss == pytest.approx((2 * x0).pow(2).mean().item(), rel=1e-5)
    # and an unfolded round trip is the identity
    assert torch.equal(torch.nn.functional.pixel_shuffle(folded, P), x0)


def test_saved_and_reloaded_with_its_patch_size(tmp_path):
    dec = patched_decoder(spatial=4)
    dec.save_pretrained(tmp_path / "dec")
    again = create("decoder", "sd-unet", pretrained=str(tmp_path / "dec"))
    assert again.patch_size == P and again.settings() == dec.settings()
    tokens, _ = data()
    with torch.no_grad():
        a = dec.eval().decode(tokens, steps=2, guidance_scale=1.0, seed=0)
        b = again.eval().decode(tokens, steps=2, guidance_scale=1.0, seed=0)
    assert torch.allclose(a, b, atol=1e-6)


def test_bad_patch_settings_are_named():
    def bare(unet, patch_size=P):
        return create(
            "decoder",
            "sd-unet",
            unet_config=unet,
            token_dim=24,
            num_tokens=4,
            patch_size=patch_size,
        )

    with pytest.raises(ValueError, match=r"12 input channels \(RGB x 4 \(patch_size 2\)\)"):
        bare(tiny_unet_config(sample_size=8))
    with pytest.raises(ValueError, match="12 output channels"):
        bare(tiny_unet_config(sample_size=8, in_channels=12))
    with pytest.raises(ValueError, match="patch_size must be >= 1"):
        bare(tiny_unet_config(), patch_size=0)
    dec = patched_decoder()
    tokens, _ = data()
    with pytest.raises(ValueError, match="sides divide by it; got 15x15"):
        dec.loss(tokens, torch.rand(4, 3, 15, 15))


def test_latent_mode_folds_the_latents():
    # 16x16 images -> 8x8 latents of 4 channels -> a 4x4 sample of 16 channels at p=2
    dec = create(
        "decoder",
        "sd-unet",
        unet_config=tiny_unet_config(sample_size=4, in_channels=16, out_channels=16),
        vae_config=tiny_vae_config(),
        token_dim=24,
        num_tokens=4,
        patch_size=P,
        seed=0,
    )
    assert dec.mode == "latent" and dec.image_size == (16, 16)
    tokens, pixels = data()
    seen = []
    hook = dec.unet.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape))
    loss = dec.loss(tokens, pixels)
    with torch.no_grad():
        images = dec.decode(tokens, steps=2, guidance_scale=1.0, seed=0)
    hook.remove()
    assert torch.isfinite(loss) and images.shape == (4, 3, 16, 16)
    assert all(shape == (4, 16, 4, 4) for shape in seen)
