"""Helpers of test_generation_eval.py: random images, pixel access, a random InceptionV3 saved
as weights files, a tiny CLIP checkpoint, a tiny unified model with a tiny decoder. All built
offline."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from metamorph_core import MetaMorphModel
from metamorph_core.testing import build_tiny_tokenizer, tiny_model_config

TINY_ENCODER = {"image_size": 16, "patch_size": 4, "hidden_size": 8, "num_tokens": 4}


def noise_images(n: int, seed: int, size: int = 16) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)
    ]


def pixels(image: Image.Image | os.PathLike) -> np.ndarray:
    if not isinstance(image, Image.Image):
        with Image.open(image) as img:
            return np.asarray(img.convert("RGB")).copy()
    return np.asarray(image.convert("RGB"))


def uint8_batch(images: list[Image.Image]) -> torch.Tensor:
    """``(b, 3, h, w)`` uint8, what torch-fidelity's InceptionV3 takes."""
    return torch.from_numpy(np.stack([pixels(i) for i in images])).permute(0, 3, 1, 2)


def gaussian_samples(mu: np.ndarray, sd: np.ndarray, n: int, seed: int) -> np.ndarray:
    """``n`` vectors whose sample mean is exactly ``mu`` and sample covariance exactly
    ``diag(sd**2)`` (random draws, centred and whitened)."""
    z = np.random.default_rng(seed).standard_normal((n, len(mu)))
    z -= z.mean(axis=0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T
    return mu + z * sd


@pytest.fixture(scope="module")
def random_inception(tmp_path_factory):
    """A random InceptionV3 (torch-fidelity's, built without loading any weights) and its
    weights saved as .pth and .safetensors."""
    from safetensors.torch import save_file
    from torch_fidelity import feature_extractor_inceptionv3 as tfi

    with pytest.MonkeyPatch.context() as m:
        m.setattr(tfi, "load_state_dict_from_url", lambda *args, **kwargs: {})
        m.setattr(tfi.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
        torch.manual_seed(0)
        net = tfi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    root = tmp_path_factory.mktemp("inception")
    state = net.state_dict()
    torch.save(state, root / "inception.pth")
    save_file({k: v.contiguous() for k, v in state.items()}, root / "inception.safetensors")
    return net.eval(), root


@pytest.fixture
def no_download(monkeypatch):
    from torch_fidelity import feature_extractor_inceptionv3 as tfi

    def refuse(*args, **kwargs):
        raise AssertionError("tried to download Inception weights")

    monkeypatch.setattr(tfi, "load_state_dict_from_url", refuse)


def save_tiny_clip(path):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    tokenizer = build_tiny_tokenizer()
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 32,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 16,
            "patch_size": 4,
        },
        projection_dim=8,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    CLIPImageProcessor(
        size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}
    ).save_pretrained(path)
    return path


def tiny_decoder(model: MetaMorphModel):
    from metamorph_decoders.testing import tiny_decoder

    return tiny_decoder(model)


@pytest.fixture(scope="module")
def generator(backbone_dirs) -> MetaMorphModel:
    torch.manual_seed(0)
    model = MetaMorphModel.from_config(tiny_model_config(backbone_dirs["llama"]))
    model.attach_decoder(tiny_decoder(model).eval())
    return model.eval()


@pytest.fixture(scope="module")
def checkpoint(generator, tmp_path_factory):
    return generator.save_pretrained(tmp_path_factory.mktemp("ckpt") / "model")
