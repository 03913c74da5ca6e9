"""Small components: the tiny encoder, conversations from LLaVA records, batch consistency."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from metamorph_core import create
from metamorph_core.conversation import Conversation
from metamorph_core.errors import ConversationError
from metamorph_core.testing import check_encoder
from metamorph_core.testing.samples import generation, understanding


def test_tiny_encoder_passes_the_conformance_suite():
    encoder = create(
        "encoder", "tiny-patch", image_size=16, patch_size=4, hidden_size=8, num_tokens=4
    )
    check_encoder(encoder)
    again = create(
        "encoder", "tiny-patch", image_size=16, patch_size=4, hidden_size=8, num_tokens=4
    )
    assert all(
        torch.equal(a, b)
        for a, b in zip(encoder.state_dict().values(), again.state_dict().values(), strict=True)
    )


def test_tiny_encoder_reads_pil_numpy_and_tensors_of_any_mode():
    encoder = create("encoder", "tiny-patch", image_size=16, num_tokens=4)
    rgb = np.random.default_rng(0).integers(0, 255, (20, 24, 3), dtype=np.uint8)
    inputs = [
        Image.fromarray(rgb),
        Image.fromarray(rgb).convert("L"),
        Image.fromarray(rgb).convert("RGBA"),
        Image.fromarray(rgb).convert("P"),
        rgb,
        torch.from_numpy(rgb).permute(2, 0, 1),
        torch.rand(1, 9, 9),
    ]
    pixels = encoder.preprocess(inputs)
    assert pixels.shape == (len(inputs), 3, 16, 16)
    assert torch.allclose(pixels[0], pixels[4]) and torch.allclose(pixels[0], pixels[5])
    with pytest.raises(
        ValueError, match=r"image 0: expected \(c, h, w\) with 1, 3 or 4 channels.*\(5, 4, 4\)"
    ):
        encoder.preprocess([torch.rand(5, 4, 4)])
    with pytest.raises(ValueError, match="square number"):
        create("encoder", "tiny-patch", num_tokens=10)


def test_llava_records_become_conversations():
    record = {
        "id": "r1",
        "image": "cat.png",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat is it?"},
            {"from": "gpt", "value": "A cat."},
        ],
    }
    conv = Conversation.from_llava(record)
    assert [t.role for t in conv.turns] == ["user", "assistant"] and conv.images == ["cat.png"]
    assert Conversation.from_llava(record, images=["pixels"]).images == ["pixels"]
    with pytest.raises(ConversationError, match="'r2'.*'from'"):
        Conversation.from_llava({"id": "r2", "conversations": [{"value": "hi"}]})


def test_forward_rejects_images_that_do_not_fill_the_slots(make_model):
    model = make_model()
    batch = model.prepare_batch([understanding(), generation()])
    one = {**batch, "pixel_values": batch["pixel_values"][:1]}
    with pytest.raises(
        ValueError,
        match=r"8 image slots, i.e. 2 images of 4 tokens of width 24, but the image tokens have shape \(1, 4, 24\)",
    ):
        model(**one)
    features = model.encode_images(batch["pixel_values"])
    no_pixels = {k: v for k, v in batch.items() if k != "pixel_values"}
    with pytest.raises(ValueError, match=r"shape \(1, 8, 24\)"):  # right product, wrong split
        model(**no_pixels, image_features=features.reshape(1, 8, 24))
    with pytest.raises(ValueError, match=r"shape \(2, 4, 12\)"):  # wrong width
        model(**no_pixels, image_features=features[..., :12])
    with pytest.raises(ValueError, match="neither pixel_values nor image_features"):
        model(**no_pixels)


def test_precomputed_image_features_give_the_same_loss(make_model):
    model = make_model().eval()
    batch = model.prepare_batch([understanding(), generation()])
    with torch.no_grad():
        features = model.encode_images(batch["pixel_values"])
        a = model(**batch)
        b = model(
            **{k: v for k, v in batch.items() if k != "pixel_values"}, image_features=features
        )
    assert torch.equal(a.loss, b.loss)


def test_the_default_head_is_the_papers_two_linears(make_model):
    """Every training script of the research code sets VISION_HEAD_TYPE="mlp":
    Linear(d, d) GELU Linear(d, c) (metamorph_llama.py)."""
    from metamorph_core import MetaMorphConfig

    assert MetaMorphConfig(encoder="tiny-patch", backbone="llama").head.name == "mlp"
    model = make_model()
    d, c = model.backbone.hidden_size, model.encoder.hidden_size
    layers = list(model.head.net)
    assert [type(m).__name__ for m in layers] == ["Linear", "GELU", "Linear"]
    assert (layers[0].in_features, layers[0].out_features) == (d, d)
    assert (layers[2].in_features, layers[2].out_features) == (d, c)
    assert model.head.normalize
