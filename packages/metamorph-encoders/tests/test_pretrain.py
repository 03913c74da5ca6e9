"""Small-SigLIP building blocks: the sigmoid loss, and a saved model loading through the
``siglip`` encoder (training itself is metamorph-train's ``siglip`` objective, tested there)."""

from __future__ import annotations

import pytest
import torch
import transformers

from metamorph_core import create
from metamorph_core.testing import build_tiny_tokenizer, check_encoder
from metamorph_encoders.pretrain import (
    build_siglip,
    load_siglip,
    save_siglip,
    siglip_transform,
    sigmoid_loss,
    small_siglip_config,
    tokenize_captions,
)

transformers.utils.logging.disable_progress_bar()


def _config(tokenizer, **overrides):
    """A one-layer small SigLIP config for ``tokenizer`` (16 px images of 8 px patches, width
    32, captions of 8 tokens) with ``overrides``."""
    kwargs = {"image_size": 16, "patch_size": 8, "hidden_size": 32, "num_layers": 1}
    kwargs.update(max_text_length=8, **overrides)
    return small_siglip_config(len(tokenizer), pad_token_id=tokenizer.pad_token_id, **kwargs)


def test_a_saved_small_siglip_loads_as_the_siglip_encoder(tmp_path):
    tokenizer = build_tiny_tokenizer()
    config = _config(tokenizer, image_size=32, hidden_size=64)
    model = build_siglip(config, seed=0)
    path = save_siglip(model, tokenizer, tmp_path / "siglip-small")
    encoder = create("encoder", "siglip", pretrained=str(path), num_tokens=4)
    check_encoder(encoder)
    assert encoder.hidden_size == 64 and encoder.image_size == (32, 32)
    images = list(torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():  # the encoder holds exactly the saved image tower
        pixels = encoder.preprocess(images)
        ref = model.vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states[-1]
        ours = encoder.model(pixel_values=pixels, output_hidden_states=True).hidden_states[-1]
    assert torch.equal(ref, ours)
    # the preprocessing recorded with it is the one pretraining used
    assert torch.equal(pixels, siglip_transform(config)(images))


def test_sigmoid_loss_equals_transformers_without_repeated_captions():
    tokenizer = build_tiny_tokenizer()
    config = _config(tokenizer)
    model = build_siglip(config, seed=1)
    captions = ["a red square", "a blue bar", "a green column", "two plus three"]
    ids = tokenize_captions(tokenizer, captions, 8)
    out = model(input_ids=ids, pixel_values=torch.rand(4, 3, 16, 16), return_loss=True)
    assert torch.allclose(sigmoid_loss(out.logits_per_text, ids), out.loss, atol=1e-6)
    # a repeated caption turns that off-diagonal pair into a positive
    ids2 = tokenize_captions(tokenizer, captions[:3] + captions[:1], 8)
    out2 = model(input_ids=ids2, pixel_values=torch.rand(4, 3, 16, 16))
    z = torch.full((4, 4), -1.0)
    z.fill_diagonal_(1.0)
    z[0, 3] = z[3, 0] = 1.0
    want = -torch.nn.functional.logsigmoid(z * out2.logits_per_text).sum() / 4
    assert torch.allclose(sigmoid_loss(out2.logits_per_text, ids2), want)


def test_mean_pooling_compares_the_mean_token_and_round_trips(tmp_path):
    tokenizer = build_tiny_tokenizer()
    config = _config(tokenizer, pooling="mean")
    assert config.vision_config.vision_use_head is False
    model = build_siglip(config, seed=0).eval()
    assert not any(k.startswith("vision_model.head") for k in model.state_dict())
    pixels = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    ids = tokenize_captions(tokenizer, ["a red square", "a blue bar", "two plus three"], 8)
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=pixels)
        tokens = model.vision_model(pixel_values=pixels).last_hidden_state
    # the image embedding is the mean of the tower's last tokens
    assert torch.allclose(out.image_embeds, torch.nn.functional.normalize(tokens.mean(1), dim=-1))
    path = save_siglip(model, tokenizer, tmp_path / "mean")
    with torch.no_grad():  # the whole model reloads with its pooling ...
        again = load_siglip(path).eval()(input_ids=ids, pixel_values=pixels)
    assert torch.equal(again.logits_per_text, out.logits_per_text)
    # ... and the image tower loads as the siglip encoder (no head weights are missing)
    check_encoder(create("encoder", "siglip", pretrained=str(path), num_tokens=4))


def test_an_unknown_pooling_is_refused():
    with pytest.raises(ValueError, match="pooling must be 'map' or 'mean'"):
        small_siglip_config(vocab_size=10, pooling="cls")
