"""Small-encoder pretraining with SigLIP's sigmoid loss, for domains with no pretrained encoder.

An image tower and a text tower (transformers ``SiglipModel`` with a small config) learn from
image-caption pairs with the pairwise sigmoid loss (learned temperature and bias).
:func:`sigmoid_loss` counts every pair whose captions are identical as positive: small domains
repeat captions, and treating those pairs as negatives (as the diagonal-only loss of
``SiglipModel(return_loss=True)`` does) fights the very alignment we want. Without repeats the
two losses are equal. :func:`save_siglip` writes a regular
``save_pretrained`` directory (model, tokenizer, image processor) that the ``siglip`` encoder
loads like any other. Training runs in metamorph-train's trainer: the ``siglip`` objective
(``metamorph train`` with ``objective: siglip``) uses these pieces.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from metamorph_core.checkpoint import atomic_directory
from metamorph_encoders.transforms import ImageTransform


def small_siglip_config(
    vocab_size: int,
    image_size: int = 32,
    patch_size: int = 4,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    max_text_length: int = 16,
    pad_token_id: int = 0,
    pooling: str = "map",
) -> Any:
    """A ``SiglipConfig`` for a small image tower and text tower of the same width.

    ``pooling``: how the image tower's tokens become the one embedding the loss compares with
    the caption's. ``"map"``: SigLIP's attention-pooling head. ``"mean"``: the mean of the last
    layer's tokens (no head: ``vision_use_head=False``), so whatever tells captions apart has
    to be in the tokens themselves, linearly, where a unified model reads them. (On the toy
    world, 800 steps: a linear probe of the object's shape from its token 0.81 with the head,
    0.93 with the mean; the tokens of a square and a circle, cosine 0.95 -> 0.56.)"""
    from transformers import SiglipConfig

    if pooling not in ("map", "mean"):
        raise ValueError(f"small_siglip_config: pooling must be 'map' or 'mean', got {pooling!r}")

    tower = {
        "hidden_size": hidden_size,
        "intermediate_size": 4 * hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
    }
    return SiglipConfig(
        vision_config={
            **tower,
            "image_size": image_size,
            "patch_size": patch_size,
            "vision_use_head": pooling == "map",
        },
        text_config={
            **tower,
            "vocab_size": vocab_size,
            "max_position_embeddings": max_text_length,
            "pad_token_id": pad_token_id,
            "bos_token_id": None,
            "eos_token_id": None,
        },
    )


class MeanPool(torch.nn.Module):
    """The image embedding of a tower without a pooling head: the mean of its last tokens."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states.mean(dim=1)


def _pool(model: Any) -> Any:
    """``model`` with :class:`MeanPool` as its image tower's head where its config has none
    (``pooling="mean"``); it has no weights, so nothing of it is saved."""
    vision = model.vision_model
    if not model.config.vision_config.vision_use_head:
        vision.head, vision.use_head = MeanPool(), True
    return model


def build_siglip(config: Any, seed: int = 0) -> Any:
    """A random ``SiglipModel`` from ``config`` (deterministic in ``seed``), with the SigLIP
    paper's initial temperature ``log 10`` and bias ``-10`` (transformers initialises both to
    zero, expecting pretrained weights, and a zero start barely learns)."""
    from transformers import SiglipModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SiglipModel(config)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(10.0))
        model.logit_bias.fill_(-10.0)
    return _pool(model)


def load_siglip(path: str | Path) -> Any:
    """A ``SiglipModel`` (both towers) saved by :func:`save_siglip`, with its pooling (a
    ``pooling="mean"`` tower has no head in transformers' own ``from_pretrained``)."""
    from transformers import SiglipModel

    return _pool(SiglipModel.from_pretrained(str(path)))


def siglip_transform(config: Any) -> ImageTransform:
    """The preprocessing that :func:`save_siglip` records: squash to the tower's size,
    bilinear, mean/std 0.5 (SigLIP's)."""
    s = config.vision_config.image_size
    return ImageTransform(size=(s, s), mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bilinear")


def tokenize_captions(tokenizer: Any, captions: Sequence[str], max_length: int) -> torch.Tensor:
    """``(n, max_length)`` ids, padded to ``max_length`` as SigLIP expects (its text tower pools
    the last position)."""
    if tokenizer.pad_token_id is None:
        raise ValueError("the caption tokenizer needs a pad token (SigLIP pads to max_length)")
    enc = tokenizer(
        list(captions),
        padding="max_length",
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
    )
    return enc["input_ids"]


def sigmoid_loss(logits_per_text: torch.Tensor, caption_ids: torch.Tensor) -> torch.Tensor:
    """``(n, n)`` text-image logits (scale and bias applied) and the ``(n, l)`` caption ids ->
    ``-sum log sigmoid(z * logits) / n`` with ``z = +1`` where the captions match, else ``-1``."""
    same = (caption_ids[:, None, :] == caption_ids[None, :, :]).all(-1)
    z = same.to(logits_per_text.dtype) * 2 - 1
    return -torch.nn.functional.logsigmoid(z * logits_per_text).sum() / logits_per_text.shape[0]


@torch.no_grad()
def retrieval_accuracy(
    model: Any, tokenizer: Any, images: Any, captions: Sequence[str]
) -> dict[str, float]:
    """Top-1 retrieval among the *distinct* captions of the set.

    ``image_to_text``: share of images whose best-scoring caption is their own caption text;
    ``text_to_image``: share of distinct captions whose best-scoring image carries that caption;
    ``chance``: ``1 / number of distinct captions``.
    """
    model.eval()
    device = next(model.parameters()).device
    pixels = _pixels(model, images).to(device)
    distinct = sorted(set(captions))
    ids = tokenize_captions(tokenizer, distinct, model.config.text_config.max_position_embeddings)
    img = model.get_image_features(pixel_values=pixels)
    txt = model.get_text_features(input_ids=ids.to(device))
    img = getattr(img, "pooler_output", img)
    txt = getattr(txt, "pooler_output", txt)
    sim = torch.nn.functional.normalize(img, dim=-1) @ torch.nn.functional.normalize(txt, dim=-1).T
    truth = torch.tensor([distinct.index(c) for c in captions], device=device)
    i2t = (sim.argmax(1) == truth).float().mean().item()
    t2i = (truth[sim.argmax(0)] == torch.arange(len(distinct), device=device)).float().mean().item()
    return {"image_to_text": i2t, "text_to_image": t2i, "chance": 1.0 / len(distinct)}


def save_siglip(model: Any, tokenizer: Any, path: str | Path) -> Path:
    """Write model, tokenizer and image processor with ``save_pretrained``, atomically, so that
    ``create("encoder", "siglip", pretrained=path)`` loads the image tower."""
    from transformers import SiglipImageProcessor

    t = siglip_transform(model.config)
    processor = SiglipImageProcessor(
        size={"height": t.size[0], "width": t.size[1]},
        image_mean=list(t.mean),
        image_std=list(t.std),
        resample=2,  # bilinear, as siglip_transform
    )
    path = Path(path)
    with atomic_directory(path, "siglip") as tmp:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        processor.save_pretrained(str(tmp))
    return path


def _pixels(model: Any, images: Any) -> torch.Tensor:
    """Raw images (any kind :class:`ImageTransform` reads; tensors in [0, 1]) -> the normalised
    pixels the ``siglip`` encoder will feed this tower after :func:`save_siglip`."""
    return siglip_transform(model.config)(images)


__all__ = [
    "MeanPool",
    "build_siglip",
    "load_siglip",
    "retrieval_accuracy",
    "save_siglip",
    "sigmoid_loss",
    "small_siglip_config",
    "siglip_transform",
    "tokenize_captions",
]
