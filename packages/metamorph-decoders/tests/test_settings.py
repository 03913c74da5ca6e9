"""``sd-unet``'s settings: validation, and how arguments merge with a saved ``config.json``."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from metamorph_core import create
from metamorph_core.config import ComponentSpec
from metamorph_core.decoding import DecodeConfig
from metamorph_core.errors import CheckpointError
from metamorph_decoders.settings import DecoderSettings, resolve_settings
from metamorph_decoders.testing import tiny_unet_config

SAVED = {
    "token_dim": 24,
    "num_tokens": 4,
    "mode": "pixel",
    "adapter": {"name": "mlp", "kwargs": {"hidden_dims": [48]}},
    "context_length": 8,
    "prediction_type": "v_prediction",
    "cond_dropout": 0.3,
    "snr_gamma": 5.0,
    "token_noise": 0.5,
    "null_conditioning": "learned",
    "spatial_channels": 0,
    "spatial_detail": 1,
    "spatial_hidden": 0,
    "patch_size": 1,
    "sampling": {"scheduler": "pndm", "steps": 30, "guidance_scale": 6.0},
}


def test_defaults_and_the_recorded_form():
    s = DecoderSettings(token_dim=24, num_tokens=4)
    assert s.to_dict() == {
        "token_dim": 24,
        "num_tokens": 4,
        "mode": "pixel",
        "adapter": {"name": "mlp", "kwargs": {}},
        "context_length": 77,
        "prediction_type": "epsilon",
        "cond_dropout": 0.75,
        "snr_gamma": None,
        "token_noise": 0.0,
        "null_conditioning": "zeros",
        "spatial_channels": 0,
        "spatial_detail": 1,
        "spatial_hidden": 0,
        "patch_size": 1,
        "sampling": {"scheduler": "ddim", "steps": 50, "guidance_scale": 7.5},
    }
    assert list(s.to_dict()) == [f.name for f in dataclasses.fields(DecoderSettings)]
    assert DecoderSettings(24, 4, prediction_type="v").prediction_type == "v_prediction"
    assert DecoderSettings(24, 4, adapter="query").adapter == ComponentSpec("query")
    assert isinstance(DecoderSettings(24, 4, token_noise=1).token_noise, float)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.patch_size = 2


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"token_dim": None}, "needs token_dim= and num_tokens="),
        ({"cond_dropout": 1.5}, r"cond_dropout must be in \[0, 1\], got 1.5"),
        ({"snr_gamma": 0}, "snr_gamma must be > 0"),
        ({"token_noise": -1}, r"token_noise must be >= 0 .* got -1$"),
        ({"null_conditioning": "ones"}, "null_conditioning must be 'zeros' or 'learned'"),
        ({"spatial_channels": -1}, "spatial_channels must be >= 0, got -1"),
        ({"spatial_channels": 4, "spatial_detail": 0}, "spatial_detail must be >= 1"),
        ({"spatial_detail": 2}, "spatial_detail=2 shapes the spatial conditioning map"),
        ({"spatial_channels": 4, "spatial_hidden": -1}, "spatial_hidden must be >= 0"),
        ({"spatial_hidden": 64}, "spatial_hidden=64 shapes the spatial conditioning map"),
        ({"patch_size": 0}, "patch_size must be >= 1"),
        ({"mode": "rgb"}, "decoder mode must be 'latent' or 'pixel', got 'rgb'"),
        ({"prediction_type": "x"}, "unknown prediction_type 'x'; use epsilon, v or sample"),
    ],
)
def test_bad_values_are_named(changes, message):
    with pytest.raises(ValueError, match=message):
        DecoderSettings(**{"token_dim": 24, "num_tokens": 4, **changes})


def test_given_then_saved_then_default():
    assert resolve_settings({"token_dim": 24, "num_tokens": 4}, {}) == DecoderSettings(24, 4)
    assert resolve_settings({"token_dim": 24, "num_tokens": 4}, {}, has_vae=True).mode == "latent"
    reloaded = resolve_settings({}, SAVED, root=Path("dec"))
    assert reloaded.to_dict() == SAVED
    # a bare adapter name, "v" and equal values agree with the saved ones
    same = {"adapter": "mlp", "prediction_type": "v", "context_length": 8, "token_dim": 24}
    assert resolve_settings(same, SAVED, root=Path("dec")) == reloaded
    # training settings may change on reload; so may the mode
    changed = {"cond_dropout": 0.0, "snr_gamma": 1.0, "token_noise": 0.0, "mode": "latent"}
    assert resolve_settings(changed, SAVED, root=Path("dec")) == dataclasses.replace(
        reloaded, **changed
    )
    old = {
        k: v for k, v in SAVED.items() if k not in ("spatial_detail", "spatial_hidden", "sampling")
    }
    assert resolve_settings({}, old).spatial_detail == 1  # saved before these existed
    assert resolve_settings({}, old).spatial_hidden == 0
    assert resolve_settings({}, old).sampling == DecodeConfig()
    # the default sampling may change on reload too, and is recorded without a seed
    faster = resolve_settings({"sampling": {"steps": 10, "seed": 3}}, SAVED, root=Path("dec"))
    assert faster.sampling == DecodeConfig(steps=10)


@pytest.mark.parametrize(
    "given, message",
    [
        ({"prediction_type": "epsilon"}, "prediction_type='v_prediction' but prediction_type="),
        ({"context_length": 9}, "context_length=8 but context_length=9"),
        ({"adapter": "query"}, "adapter=.*'mlp'.* but adapter=.*'query'"),
        ({"adapter": {"name": "mlp", "kwargs": {"hidden_dims": [8]}}}, "hidden_dims': \\[8\\]"),
        ({"null_conditioning": "zeros"}, "null_conditioning='learned' but"),
    ],
)
def test_contradicting_a_saved_decoder_is_an_error(given, message):
    with pytest.raises(CheckpointError, match=f"decoder in 'dec' was saved with .*{message}"):
        resolve_settings(given, SAVED, root=Path("dec"))


def test_unknown_settings_are_named():
    with pytest.raises(TypeError, match=r"unknown decoder setting\(s\) \['dtype'\]"):
        resolve_settings({"dtype": "float32"}, {})


def test_the_decoder_mirrors_its_settings():
    dec = create(
        "decoder", "sd-unet", unet_config=tiny_unet_config(), token_dim=24, num_tokens=4, seed=0
    )
    assert isinstance(dec.config, DecoderSettings) and dec.token_dim == 24
    assert dec.settings() == {**dec.config.to_dict(), "dtype": "float32"}
    dec.cond_dropout = 0.1  # training settings may change, validated
    assert dec.config.cond_dropout == 0.1 and dec.settings()["cond_dropout"] == 0.1
    with pytest.raises(ValueError, match="cond_dropout must be in"):
        dec.cond_dropout = 2.0
    with pytest.raises(AttributeError):
        dec.patch_size = 2  # the modules were built for it


def test_the_recorded_sampling_is_what_decode_does_by_default(tmp_path):
    """The paper's visualizer samples with the SD 1.5 pipeline's default PNDM, 50 steps; a
    decoder records its default sampling, and decode() without a config uses it."""
    dec = create(
        "decoder",
        "sd-unet",
        token_dim=24,
        num_tokens=4,
        unet_config=tiny_unet_config(),
        context_length=8,
        sampling={"scheduler": "pndm", "steps": 3, "guidance_scale": 2.0},
        seed=0,
    ).eval()
    tokens = torch.randn(1, 4, 24, generator=torch.Generator().manual_seed(1))
    own = dec.decode(tokens, seed=0)
    explicit = DecodeConfig(scheduler="pndm", steps=3, guidance_scale=2.0, seed=0)
    assert torch.equal(own, dec.decode(tokens, explicit))
    assert not torch.equal(own, dec.decode(tokens, DecodeConfig(steps=3, seed=0)))  # ddim, 7.5
    assert torch.equal(dec.decode(tokens, {"steps": 3}, seed=0), own)  # a dict: over its own
    loaded = create(
        "decoder", "sd-unet", pretrained=str(tmp_path / "d"), **dec.save_pretrained(tmp_path / "d")
    )
    assert loaded.sampling == DecodeConfig(scheduler="pndm", steps=3, guidance_scale=2.0)
    assert torch.equal(loaded.eval().decode(tokens, seed=0), own)
