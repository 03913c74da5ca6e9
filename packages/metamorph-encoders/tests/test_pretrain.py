"""Sigmoid-loss pretraining learns image-text retrieval on a synthetic set; its checkpoint loads
through the ``siglip`` encoder."""

from __future__ import annotations

import torch
import transformers

from metamorph_core import create
from metamorph_core.testing import build_tiny_tokenizer, check_encoder
from metamorph_encoders.pretrain import (
    SiglipTrainConfig,
    build_siglip,
    retrieval_accuracy,
    save_siglip,
    sigmoid_loss,
    small_siglip_config,
    tokenize_captions,
    train_siglip,
)

transformers.utils.logging.disable_progress_bar()

COLOURS = {
    "red": (0.9, 0.1, 0.1),
    "green": (0.1, 0.8, 0.2),
    "blue": (0.1, 0.2, 0.9),
    "yellow": (0.95, 0.9, 0.1),
}
SHAPES = ("square", "bar", "column")


def render(colour: str, shape: str, gen: torch.Generator) -> torch.Tensor:
    """32x32: a coloured square, horizontal bar or vertical column at a random place, on a
    noisy grey background."""
    img = 0.5 + 0.05 * torch.randn(3, 32, 32, generator=gen)
    h, w = {"square": (10, 10), "bar": (5, 20), "column": (20, 5)}[shape]
    y = int(torch.randint(0, 32 - h, (1,), generator=gen))
    x = int(torch.randint(0, 32 - w, (1,), generator=gen))
    img[:, y : y + h, x : x + w] = torch.tensor(COLOURS[colour])[:, None, None]
    return img.clamp(0, 1)


def dataset(per_class: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    gen = torch.Generator().manual_seed(seed)
    images, captions = [], []
    for _ in range(per_class):
        for colour in COLOURS:
            for shape in SHAPES:
                images.append(render(colour, shape, gen))
                captions.append(f"a {colour} {shape}")
    return torch.stack(images), captions


def test_sigmoid_pretraining_learns_retrieval_and_loads_as_siglip(tmp_path):
    tokenizer = build_tiny_tokenizer()
    config = small_siglip_config(
        vocab_size=len(tokenizer),
        image_size=32,
        patch_size=8,
        hidden_size=64,
        num_layers=1,
        max_text_length=8,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = build_siglip(config, seed=0)
    train_images, train_captions = dataset(per_class=64, seed=0)
    test_images, test_captions = dataset(per_class=4, seed=1)  # unseen renders
    before = retrieval_accuracy(model, tokenizer, test_images, test_captions)
    losses = train_siglip(
        model,
        tokenizer,
        train_images,
        train_captions,
        SiglipTrainConfig(steps=500, batch_size=48, lr=1e-3, warmup_steps=30),
        log=None,
    )
    after = retrieval_accuracy(model, tokenizer, test_images, test_captions)
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10
    assert after["chance"] == 1 / 12
    assert before["image_to_text"] < 0.3
    # chance is 1/12; colour alone would give about 1/3 (measured: 0.73 and 0.92)
    assert after["image_to_text"] > 0.5 and after["text_to_image"] > 0.5, (before, after)

    path = save_siglip(model, tokenizer, tmp_path / "siglip-small")
    encoder = create("encoder", "siglip", pretrained=str(path), num_tokens=4)
    check_encoder(encoder)
    assert encoder.hidden_size == 64 and encoder.image_size == (32, 32)
    with torch.no_grad():  # the encoder holds exactly the trained image tower
        pixels = encoder.preprocess(list(test_images[:3]))
        ref = model.vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states[-1]
        ours = encoder.model(pixel_values=pixels, output_hidden_states=True).hidden_states[-1]
    assert torch.equal(ref, ours)


def test_sigmoid_loss_equals_transformers_without_repeated_captions():
    tokenizer = build_tiny_tokenizer()
    config = small_siglip_config(
        vocab_size=len(tokenizer),
        image_size=16,
        patch_size=8,
        hidden_size=32,
        num_layers=1,
        max_text_length=8,
        pad_token_id=tokenizer.pad_token_id,
    )
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
