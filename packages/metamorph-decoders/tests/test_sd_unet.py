"""The sd-unet decoder on tiny UNets/VAEs saved in the Stable Diffusion layout."""

from __future__ import annotations

import logging

import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from sd15_config import SD15_SCHEDULER, SD15_UNET, SD15_VAE

from metamorph_core import MetaMorphModel, create
from metamorph_core.decoding import DecodeConfig
from metamorph_core.errors import CheckpointError, ShapeMismatchError
from metamorph_core.testing import save_tiny_backbone, tiny_model_config
from metamorph_decoders.loading import plan_weight_load
from metamorph_decoders.sampler import DiffusionSampler
from metamorph_decoders.testing import tiny_unet_config, tiny_vae_config

UNET = tiny_unet_config()
VAE = tiny_vae_config()
ADAPTER = {"name": "mlp", "kwargs": {"hidden_dims": [48]}}


@pytest.fixture(scope="module")
def sd_dirs(tmp_path_factory):
    """Two SD-layout directories written by diffusers itself: latent (with vae/) and pixel."""
    root = tmp_path_factory.mktemp("sd")
    torch.manual_seed(0)
    UNet2DConditionModel(
        **{**UNET, "in_channels": 4, "out_channels": 4, "sample_size": 8}
    ).save_pretrained(root / "latent" / "unet")
    AutoencoderKL(**VAE).save_pretrained(root / "latent" / "vae")
    UNet2DConditionModel(**UNET).save_pretrained(root / "pixel" / "unet")
    for mode in ("latent", "pixel"):
        DDPMScheduler(num_train_timesteps=100, clip_sample=False).save_pretrained(
            root / mode / "scheduler"
        )
    return root


def decoder(path, **kw):
    return create(
        "decoder",
        "sd-unet",
        pretrained=str(path),
        token_dim=24,
        num_tokens=4,
        **{"adapter": ADAPTER, "seed": 0, **kw},
    )


def data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 4, 24, generator=g), torch.rand(4, 3, 16, 16, generator=g)


def _record_contexts(dec, seen: list):
    """Append every context the UNet receives to ``seen``; returns the hook handle."""
    return dec.unet.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["encoder_hidden_states"].clone()),
        with_kwargs=True,
    )


def fixed_loss(dec, tokens, pixels):
    dec.eval()
    with torch.no_grad():
        return dec.loss(tokens, pixels, generator=torch.Generator().manual_seed(123)).item()


@pytest.mark.parametrize("mode", ["pixel", "latent"])
def test_loads_sd_layout_trains_and_round_trips(sd_dirs, tmp_path, mode):
    dec = decoder(sd_dirs / mode, cond_dropout=0.5)
    assert dec.mode == mode and dec.image_size == (16, 16)
    assert (dec.vae is not None) == (mode == "latent")
    tokens, pixels = data()
    before = fixed_loss(dec, tokens, pixels)
    opt = torch.optim.AdamW([p for p in dec.parameters() if p.requires_grad], lr=2e-3)
    torch.manual_seed(0)
    for _ in range(40):
        dec.training_step(tokens, pixels, opt)
    assert fixed_loss(dec, tokens, pixels) < 0.8 * before
    if dec.vae is not None:  # the VAE is frozen
        assert not any(p.requires_grad for p in dec.vae.parameters())
    kwargs = dec.save_pretrained(tmp_path / "dec")
    assert {p.name for p in (tmp_path / "dec").iterdir()} >= {
        "unet",
        "scheduler",
        "adapter.safetensors",
        "config.json",
    }
    again = create("decoder", "sd-unet", pretrained=str(tmp_path / "dec"), **kwargs)
    a, b = dec.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(dec.decode(tokens, steps=3, seed=1), again.decode(tokens, steps=3, seed=1))


def test_sampling_is_seeded_and_guidance_matters(sd_dirs):
    dec = decoder(sd_dirs / "pixel").eval()
    tokens, _ = data()
    a = dec.decode(tokens[:2], steps=4, guidance_scale=3.0, seed=7)
    assert a.shape == (2, 3, 16, 16) and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, dec.decode(tokens[:2], steps=4, guidance_scale=3.0, seed=7))
    assert not torch.equal(a, dec.decode(tokens[:2], steps=4, guidance_scale=3.0, seed=8))
    assert not torch.allclose(a, dec.decode(tokens[:2], steps=4, guidance_scale=1.0, seed=7))
    for name in ("ddpm", "dpm-solver++", "euler", "euler-ancestral", "unipc", "pndm", "heun"):
        assert dec.decode(tokens[:1], scheduler=name, steps=3, seed=0).shape == (1, 3, 16, 16)
    pil = dec.decode(tokens[:2], steps=2, seed=0, output_type="pil")
    assert len(pil) == 2 and pil[0].size == (16, 16)


def test_decode_takes_a_config_and_delegates_to_the_sampler(sd_dirs):
    dec = decoder(sd_dirs / "pixel").eval()
    tokens, _ = data()
    config = DecodeConfig(scheduler="ddim", steps=2, guidance_scale=3.0, seed=7)
    a = dec.decode(tokens[:2], config)
    assert torch.equal(a, dec.decode(tokens[:2], steps=2, guidance_scale=3.0, seed=7))
    assert torch.equal(a, dec.decode(tokens[:2], {"steps": 2, "guidance_scale": 3.0, "seed": 7}))
    assert torch.equal(
        a, dec.decode(tokens[:2], DecodeConfig(steps=5, seed=7), steps=2, guidance_scale=3.0)
    )
    assert torch.equal(a, DiffusionSampler(dec).sample(tokens[:2], config))
    g = torch.Generator().manual_seed(7)  # a generator draws the noise instead of the seed
    assert torch.equal(a, dec.decode(tokens[:2], steps=2, guidance_scale=3.0, generator=g))


def test_a_progress_bar_counts_the_denoising_steps_and_changes_no_pixel(sd_dirs, monkeypatch):
    import tqdm.auto

    dec = decoder(sd_dirs / "pixel").eval()
    tokens, _ = data()
    quiet = dec.decode(tokens[:1], steps=3, seed=0)
    bars = []

    class Bar(tqdm.auto.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "disable": False})
            bars.append(self)

    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    dec.set_progress_bar(True)
    shown = dec.decode(tokens[:1], steps=3, seed=0)
    assert [(b.total, b.n, b.desc) for b in bars] == [(3, 3, "decoding")]
    assert torch.equal(quiet, shown)


def test_dropped_conditioning_is_exactly_the_unconditional_branch(sd_dirs):
    for null in ("zeros", "learned"):
        dec = decoder(sd_dirs / "pixel", cond_dropout=1.0, null_conditioning=null)
        if null == "learned":
            with torch.no_grad():
                dec.null_context.normal_()
        seen = []
        hook = _record_contexts(dec, seen)
        tokens, pixels = data()
        dec.train()
        dec.loss(tokens, pixels)  # p = 1: every sample dropped
        dec.decode(tokens, steps=1, guidance_scale=5.0, seed=0)  # batched [uncond, cond]
        hook.remove()
        dropped, guided = seen[0], seen[1]
        assert torch.equal(dropped, guided[: len(tokens)]), null
        assert torch.equal(guided[len(tokens) :], dec.context(tokens))
        assert not torch.equal(dropped, dec.context(tokens))
        if null == "zeros":  # the paper: the adapter's output zeroed
            assert not dropped.any()


def test_cross_attention_reshape_is_explicit_and_logged(sd_dirs, caplog):
    wide = {"name": "mlp", "kwargs": {"hidden_dims": [48], "out_dim": 40}}
    with pytest.raises(
        ValueError,
        match="cross-attention width is 32 but adapter 'MLPAdapter' outputs 40; set reshape_cross_attention=True",
    ):
        decoder(sd_dirs / "pixel", adapter=wide)
    with caplog.at_level(logging.WARNING, logger="metamorph"):
        dec = decoder(sd_dirs / "pixel", adapter=wide, reshape_cross_attention=True)
    assert dec.unet.config.cross_attention_dim == 40
    # 4 transformer blocks (1 down, 1 mid, 2 up) x (to_k, to_v)
    assert "re-initialised 8 weights" in caplog.text and "attn2.to_k.weight" in caplog.text
    base = UNet2DConditionModel.from_pretrained(sd_dirs / "pixel" / "unet").state_dict()
    ours = dec.unet.state_dict()
    kept = [k for k in ours if "attn2.to_k" not in k and "attn2.to_v" not in k]
    assert all(torch.equal(ours[k], base[k]) for k in kept)


def test_sd15_configs_map_onto_our_loader_on_the_meta_device():
    with torch.device("meta"):
        sd15 = UNet2DConditionModel.from_config(SD15_UNET)
        ours = create(
            "decoder",
            "sd-unet",
            token_dim=1152,
            num_tokens=64,
            unet_config=SD15_UNET,
            vae_config=SD15_VAE,
            scheduler_config=SD15_SCHEDULER,
        )
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}  # noqa: E731
    same = plan_weight_load(shapes(sd15), shapes(ours.unet), "sd15")
    assert same.reinit == [] and len(same.load) == len(sd15.state_dict())
    # the paper's adapter: 1152 -> 2048 -> 768, padded to 77 tokens; SD's VAE scaling
    assert [tuple(m.weight.shape) for m in ours.adapter.net if isinstance(m, torch.nn.Linear)] == [
        (2048, 1152),
        (768, 2048),
    ]
    assert ours.context_length == 77 and ours.vae.config.scaling_factor == 0.18215
    assert ours.mode == "latent" and ours.image_size == (512, 512)
    with torch.device("meta"):
        wider = UNet2DConditionModel.from_config({**SD15_UNET, "cross_attention_dim": 1024})
    plan = plan_weight_load(shapes(sd15), shapes(wider), "sd15")
    assert len(plan.reinit) == 32  # 16 transformer blocks x (to_k, to_v)
    assert all(k.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) for k in plan.reinit)
    broken = dict(shapes(sd15))
    broken.pop("conv_in.weight")
    with pytest.raises(CheckpointError, match=r"missing \['conv_in.weight'\]"):
        plan_weight_load(broken, shapes(sd15), "sd15")


def test_bad_input_is_named(sd_dirs, tmp_path):
    dec = decoder(sd_dirs / "pixel")
    with pytest.raises(ValueError, match=r"expects tokens \(b, n, 24\).*got \(1, 4, 16\)"):
        dec.decode(torch.randn(1, 4, 16), steps=2)
    with pytest.raises(ValueError, match=r"decoder guidance_scale must be >= 0 .*got -1"):
        dec.decode(torch.randn(1, 4, 24), guidance_scale=-1)
    with pytest.raises(ValueError, match="decoder steps must be an integer >= 1, got 0"):
        dec.decode(torch.randn(1, 4, 24), steps=0)
    with pytest.raises(ValueError, match=r"unknown decoder option\(s\) \['stpes'\]"):
        dec.decode(torch.randn(1, 4, 24), stpes=2)
    with pytest.raises(ValueError, match="output_type must be 'pt' or 'pil', got 'np'"):
        dec.decode(torch.randn(1, 4, 24), steps=1, output_type="np")
    with pytest.raises(ValueError, match="unknown scheduler 'fast'; known: ddpm, ddim"):
        dec.decode(torch.randn(1, 4, 24), scheduler="fast")
    (tmp_path / "scheduler").mkdir()
    with pytest.raises(CheckpointError, match="has no unet/ subfolder"):
        decoder(tmp_path)
    with pytest.raises(CheckpointError, match="has no vae/ subfolder"):
        decoder(sd_dirs / "pixel", mode="latent")


def test_attached_to_a_unified_model(sd_dirs, tmp_path):
    model = MetaMorphModel.from_config(tiny_model_config(save_tiny_backbone(tmp_path / "bb")))
    tokens = torch.randn(2, 4, 24)
    with pytest.raises(ValueError, match="no visual decoder is attached.*attach_decoder"):
        model.decode_images(tokens)
    with pytest.raises(
        ShapeMismatchError,
        match="reads 9 tokens of width 24 but encoder 'tiny-patch' gives 4 tokens",
    ):
        model.attach_decoder(
            create(
                "decoder",
                "sd-unet",
                pretrained=str(sd_dirs / "pixel"),
                token_dim=24,
                num_tokens=9,
                adapter=ADAPTER,
            )
        )
    model.attach_decoder(decoder(sd_dirs / "pixel"))
    images = model.decode_images(tokens, steps=2, seed=0)
    assert images.shape == (2, 3, 16, 16)
    path = model.save_pretrained(tmp_path / "ckpt")
    assert (path / "decoder" / "unet").is_dir()
    loaded = MetaMorphModel.from_pretrained(path)
    assert torch.equal(loaded.decode_images(tokens, steps=2, seed=0), images)


def _zero_unet(dec):
    """Make the UNet predict zeros, so the loss is the mean square of the target."""
    return dec.unet.register_forward_hook(
        lambda m, i, o: type(o)(sample=torch.zeros_like(o.sample))
    )


@pytest.mark.parametrize("prediction_type", ["epsilon", "v", "sample"])
def test_loss_targets_by_hand(sd_dirs, prediction_type):
    dec = decoder(sd_dirs / "pixel", prediction_type=prediction_type).eval()
    tokens, pixels = data()
    hook = _zero_unet(dec)
    with torch.no_grad():
        loss = dec.loss(tokens, pixels, generator=torch.Generator().manual_seed(5)).item()
    hook.remove()
    g = torch.Generator().manual_seed(5)  # the same draws, in the same order
    noise = torch.randn(pixels.shape, generator=g)
    t = torch.randint(0, 100, (4,), generator=g)
    x0 = pixels * 2 - 1
    a = dec.noise_scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    target = {"epsilon": noise, "v": a.sqrt() * noise - (1 - a).sqrt() * x0, "sample": x0}
    assert loss == pytest.approx(target[prediction_type].pow(2).mean().item(), rel=1e-5)


def test_saved_settings_reload_from_the_directory_alone(sd_dirs, tmp_path):
    dec = decoder(
        sd_dirs / "pixel",
        prediction_type="v",
        context_length=8,
        null_conditioning="learned",
        cond_dropout=0.3,
    )
    with torch.no_grad():
        dec.null_context.normal_()
    dec.save_pretrained(tmp_path / "dec")
    again = create("decoder", "sd-unet", pretrained=str(tmp_path / "dec"))
    assert again.settings() == dec.settings()
    assert torch.equal(again.null_context, dec.null_context)
    with pytest.raises(
        CheckpointError,
        match="saved with prediction_type='v_prediction' but prediction_type='epsilon'",
    ):
        create("decoder", "sd-unet", pretrained=str(tmp_path / "dec"), prediction_type="epsilon")


def test_sd15_scheduler_and_weight_variants(sd_dirs, tmp_path, caplog):
    import json
    import shutil

    root = tmp_path / "sd15-like"
    shutil.copytree(sd_dirs / "pixel" / "unet", root / "unet")
    UNet2DConditionModel.from_pretrained(root / "unet").half().save_pretrained(
        root / "unet", variant="fp16"
    )
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(
        json.dumps(
            {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", **SD15_SCHEDULER}
        )
    )
    dec = create(
        "decoder",
        "sd-unet",
        pretrained=str(root),
        token_dim=24,
        num_tokens=4,
        adapter={"name": "mlp", "kwargs": {"hidden_dims": [48], "out_dim": 40}},
        reshape_cross_attention=True,
    )
    betas = dec.noise_scheduler.betas
    assert betas[0].item() == pytest.approx(0.00085) and betas[-1].item() == pytest.approx(0.012)
    base = UNet2DConditionModel.from_pretrained(root / "unet").state_dict()  # the fp32 file
    ours = dec.unet.state_dict()
    assert torch.equal(ours["conv_in.weight"], base["conv_in.weight"])  # not the fp16 variant
    shutil.rmtree(root / "scheduler")
    with pytest.raises(CheckpointError, match="has no scheduler/ subfolder"):
        create("decoder", "sd-unet", pretrained=str(root), token_dim=24, num_tokens=4)
    with pytest.raises(ValueError, match="scheduler_config= cannot be combined with pretrained="):
        create(
            "decoder",
            "sd-unet",
            pretrained=str(sd_dirs / "pixel"),
            token_dim=24,
            num_tokens=4,
            scheduler_config=SD15_SCHEDULER,
        )


def test_dropout_is_per_sample_and_off_in_eval(sd_dirs):
    dec = decoder(sd_dirs / "pixel", cond_dropout=0.5)
    seen = []
    hook = _record_contexts(dec, seen)
    tokens, pixels = data()
    dec.train()
    dec.loss(tokens, pixels, generator=torch.Generator().manual_seed(0))
    dec.eval()
    dec.loss(tokens, pixels, generator=torch.Generator().manual_seed(0))
    hook.remove()
    dropped = [not row.any() for row in seen[0]]
    assert any(dropped) and not all(dropped)
    assert not any(not row.any() for row in seen[1])


def test_bfloat16_and_incompatible_scheduler(sd_dirs):
    dec = decoder(sd_dirs / "pixel", dtype="bfloat16")
    assert dec.unet.dtype == torch.bfloat16
    tokens, pixels = data()
    assert torch.isfinite(dec.loss(tokens, pixels))
    assert dec.decode(tokens[:1], steps=2, seed=0).dtype == torch.float32
    x0 = decoder(sd_dirs / "pixel", prediction_type="sample")
    with pytest.raises(
        ValueError,
        match="scheduler 'pndm' cannot sample a model trained for prediction_type 'sample'; use one of ddpm, ddim",
    ):
        x0.decode(tokens[:1], scheduler="pndm", steps=2)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v", "sample"])
def test_min_snr_weights_by_hand(sd_dirs, tmp_path, prediction_type):
    dec = decoder(sd_dirs / "pixel", prediction_type=prediction_type, snr_gamma=2.0).eval()
    tokens, pixels = data()
    hook = _zero_unet(dec)
    with torch.no_grad():
        loss = dec.loss(tokens, pixels, generator=torch.Generator().manual_seed(5)).item()
    hook.remove()
    g = torch.Generator().manual_seed(5)
    noise = torch.randn(pixels.shape, generator=g)
    t = torch.randint(0, 100, (4,), generator=g)
    x0 = pixels * 2 - 1
    a = dec.noise_scheduler.alphas_cumprod[t]
    snr = a / (1 - a)
    a = a.view(-1, 1, 1, 1)
    target = {"epsilon": noise, "v": a.sqrt() * noise - (1 - a).sqrt() * x0, "sample": x0}
    # Min-SNR: the clean-image loss weighted by min(SNR, gamma); the epsilon loss is the
    # clean-image loss times SNR, the v loss times SNR + 1
    to_x0 = {"epsilon": 1 / snr, "v": 1 / (snr + 1), "sample": 1.0}[prediction_type]
    weight = torch.minimum(snr, torch.tensor(2.0)) * to_x0
    expected = (target[prediction_type].pow(2).flatten(1).mean(1) * weight).mean().item()
    assert loss == pytest.approx(expected, rel=1e-5)
    dec.save_pretrained(tmp_path / "dec")
    assert create("decoder", "sd-unet", pretrained=str(tmp_path / "dec")).snr_gamma == 2.0
    with pytest.raises(ValueError, match="snr_gamma must be > 0"):
        decoder(sd_dirs / "pixel", snr_gamma=0)


def test_token_noise_augments_the_conditioning_in_training_only(sd_dirs, tmp_path):
    dec = decoder(sd_dirs / "pixel", prediction_type="sample", token_noise=1.0, cond_dropout=0.0)
    tokens, pixels = data()
    seen = []
    hook = dec.adapter.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    with torch.no_grad():
        dec.train()
        dec.loss(tokens, pixels, generator=torch.Generator().manual_seed(5))
        dec.eval()
        dec.loss(tokens, pixels, generator=torch.Generator().manual_seed(5))
    hook.remove()
    trained, evaluated = seen
    assert torch.equal(evaluated, tokens)  # no augmentation outside training
    assert not torch.allclose(trained, tokens)
    assert torch.allclose(trained.norm(dim=-1), tokens.norm(dim=-1), rtol=1e-4)
    dec.save_pretrained(tmp_path / "dec")
    assert create("decoder", "sd-unet", pretrained=str(tmp_path / "dec")).token_noise == 1.0
    with pytest.raises(ValueError, match="token_noise must be >= 0"):
        decoder(sd_dirs / "pixel", token_noise=-0.5)
