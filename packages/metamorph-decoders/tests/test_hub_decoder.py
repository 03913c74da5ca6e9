"""The sd-unet decoder named by a Hugging Face Hub repo id, read offline from a pre-populated
local Hub cache: a decoder repo, a MetaMorph checkpoint repo's ``decoder/`` subfolder, only the
files a decoder reads fetched, and nothing about where it came from saved."""

from __future__ import annotations

import json
import shutil

import huggingface_hub
import pytest
import torch
from huggingface_hub.utils import filter_repo_objects

from metamorph_core import ComponentSpec, MetaMorphModel, create
from metamorph_core.errors import CheckpointError
from metamorph_core.testing import populate_hub_cache, save_tiny_backbone, tiny_model_config
from metamorph_core.testing.hub import offline_hub
from metamorph_decoders.loading import DECODER_FILES
from metamorph_decoders.testing import tiny_unet_config, tiny_vae_config

SETTINGS = {"token_dim": 24, "num_tokens": 4, "adapter": {"name": "mlp", "kwargs": {}}}
LATENT_UNET = tiny_unet_config(in_channels=4, out_channels=4, sample_size=8)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    return offline_hub(monkeypatch, tmp_path / "hub-cache")


@pytest.fixture
def saved_decoder(tmp_path):
    """A tiny latent-space decoder (unet/, vae/, scheduler/, adapter, config) and its
    directory."""
    dec = create(
        "decoder",
        "sd-unet",
        unet_config=LATENT_UNET,
        vae_config=tiny_vae_config(),
        seed=0,
        **SETTINGS,
    )
    assert dec.mode == "latent"
    dec.save_pretrained(tmp_path / "dec")
    return dec, tmp_path / "dec"


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_decoder_loads_by_repo_id(saved_decoder, cache):
    dec, path = saved_decoder
    populate_hub_cache(cache, "org/decoder", path)
    loaded = create("decoder", "sd-unet", pretrained="org/decoder")
    assert same_weights(loaded, dec) and loaded.settings() == dec.settings()
    with pytest.raises(CheckpointError, match="decoder 'sd-unet' pretrained 'org/missing'"):
        create("decoder", "sd-unet", pretrained="org/missing")


def test_a_metamorph_checkpoint_repo_gives_its_decoder_by_subfolder(saved_decoder, cache, tmp_path):
    dec, _ = saved_decoder
    model = MetaMorphModel.from_config(tiny_model_config(save_tiny_backbone(tmp_path / "bb")))
    model.attach_decoder(dec)
    populate_hub_cache(cache, "org/metamorph", model.save_pretrained(tmp_path / "ckpt"))
    loaded = create("decoder", "sd-unet", pretrained="org/metamorph", subfolder="decoder")
    assert same_weights(loaded, dec)
    assert same_weights(MetaMorphModel.from_pretrained("org/metamorph").decoder, dec)
    with pytest.raises(CheckpointError, match="has no subfolder 'nope/'; check subfolder="):
        create("decoder", "sd-unet", pretrained="org/metamorph", subfolder="nope")
    with pytest.raises(ValueError, match=r"\['subfolder'\] say where pretrained= is read from"):
        create("decoder", "sd-unet", unet_config=tiny_unet_config(), subfolder="decoder")


def test_only_the_files_a_decoder_reads_are_fetched(saved_decoder, cache, tmp_path, monkeypatch):
    dec, path = saved_decoder
    shutil.copytree(path, tmp_path / "repo" / "dec")  # a repo holding the decoder in dec/
    populate_hub_cache(cache, "org/metamorph", tmp_path / "repo", symlinks=False)
    asked = []
    download = huggingface_hub.snapshot_download

    def spy(*args, **kwargs):
        asked.append(kwargs["allow_patterns"])
        return download(*args, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", spy)
    assert same_weights(
        create("decoder", "sd-unet", pretrained="org/metamorph", subfolder="dec"), dec
    )
    assert asked == [[f"dec/{p}" for p in DECODER_FILES]]
    written = [p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()]
    assert sorted(filter_repo_objects(written, allow_patterns=DECODER_FILES)) == sorted(written)
    pipeline_extras = [
        "model_index.json",
        "text_encoder/model.safetensors",
        "safety_checker/model.safetensors",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "unet/diffusion_pytorch_model.non_ema.safetensors",
        "unet/diffusion_pytorch_model.bin",
        "v1-5-pruned-emaonly.ckpt",
    ]
    assert list(filter_repo_objects(pipeline_extras, allow_patterns=DECODER_FILES)) == []


def test_where_a_hub_decoder_came_from_is_not_saved(saved_decoder, cache, tmp_path):
    """revision / cache_dir / local_files_only say where to read the decoder, not what it is:
    the checkpoint holds the decoder itself and reloads with the cache gone."""
    dec, path = saved_decoder
    populate_hub_cache(cache, "org/decoder", path, revision="v1")
    where = {"revision": "v1", "cache_dir": str(cache), "local_files_only": True}
    config = tiny_model_config(
        save_tiny_backbone(tmp_path / "bb"),
        decoder=ComponentSpec("sd-unet", {"pretrained": "org/decoder", **where}),
    )
    model = MetaMorphModel.from_config(config)
    assert same_weights(model.decoder, dec)
    saved = model.save_pretrained(tmp_path / "ckpt")
    entry = json.loads((saved / "config.json").read_text())["components"]["decoder"]
    assert not set(entry["load_kwargs"]) & {"subfolder", *where}
    assert not set(json.loads((saved / "decoder" / "config.json").read_text())) & {*where}
    assert str(cache) not in (saved / "README.md").read_text()
    shutil.rmtree(cache)
    assert same_weights(MetaMorphModel.from_pretrained(saved).decoder, dec)
