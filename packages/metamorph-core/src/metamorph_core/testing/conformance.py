"""Conformance checks that any component plugin can run in its own tests::

from metamorph_core.testing import check_encoder
check_encoder(create("encoder", "my-encoder", ...))
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch

from metamorph_core.interfaces import VisionEncoder
from metamorph_core.pixels import Pixels, split_pixels, stack_pixels


def _sample_images(h: int, w: int) -> list[object]:
    """Mixed kinds and sizes: float and uint8 tensors, grayscale, HWC arrays, PIL (if present)."""
    g = torch.Generator().manual_seed(0)
    images: list[object] = [
        torch.rand(3, h + 3, w + 5, generator=g),
        (torch.rand(3, max(4, h // 2), max(4, w // 2), generator=g) * 255).to(torch.uint8),
        torch.rand(1, h, w, generator=g),
        (torch.rand(h, w + 1, 3, generator=g) * 255).to(torch.uint8).numpy(),
    ]
    try:
        from PIL import Image

        rgba = (torch.rand(h, w, 4, generator=g) * 255).to(torch.uint8).numpy()
        images += [Image.fromarray(rgba, "RGBA"), Image.fromarray(rgba[..., 0], "L").convert("P")]
    except ImportError:
        pass
    return images


def _check_pixels(pixels: Pixels, n: int, size: tuple[int, int]) -> None:
    """A ``(n, 3, h, w)`` float32 tensor, or a dict of tensors with ``n`` rows each (its
    floating-point fields float32)."""
    if isinstance(pixels, torch.Tensor):
        assert tuple(pixels.shape) == (n, 3, *size), f"preprocess gave {tuple(pixels.shape)}"
    else:
        assert isinstance(pixels, Mapping) and pixels, (
            f"preprocess must give a (b, 3, h, w) tensor or a dict of tensors, got "
            f"{type(pixels).__name__}"
        )
    for name, x in _fields(pixels).items():
        assert isinstance(x, torch.Tensor) and len(x) == n, (
            f"preprocess field '{name}' must be a tensor with the {n} images along dim 0"
        )
        if x.is_floating_point():
            assert x.dtype == torch.float32, f"preprocess gave {name} in {x.dtype}, not float32"
            assert torch.isfinite(x).all(), f"preprocess gave NaN/inf in {name}"


def _fields(pixels: Pixels) -> Mapping[str, torch.Tensor]:
    return {"pixels": pixels} if isinstance(pixels, torch.Tensor) else pixels


def _probe(pixels: Pixels) -> Pixels:
    """The first image of ``pixels``, its floating-point tensors requiring grad."""
    first = stack_pixels(split_pixels(pixels)[:1])
    if isinstance(first, torch.Tensor):
        return first.clone().requires_grad_(True)
    return {k: v.clone().requires_grad_(v.is_floating_point()) for k, v in first.items()}


def check_encoder(encoder: VisionEncoder, atol: float = 1e-5) -> None:
    """Assert that ``encoder`` honours the :class:`VisionEncoder` contract: declared shapes;
    preprocessing of mixed kinds, modes and sizes, to a pixel tensor or a dict of fields; each
    image preprocessed alone gives its row of the batch; clear errors on bad input;
    determinism; frozen = no grads, eval mode, no autograd graph; float32/bfloat16 weights
    both give finite tokens of the declared shape; L2-normalised tokens when the encoder
    normalises."""
    assert isinstance(encoder, VisionEncoder), f"{type(encoder).__name__} is not a VisionEncoder"
    for attr in ("hidden_size", "num_tokens", "image_size"):
        assert hasattr(encoder, attr), f"encoder must declare {attr}"
    h, w = encoder.image_size
    images = _sample_images(h, w)
    pixels = encoder.preprocess(images)
    _check_pixels(pixels, len(images), (h, w))
    rows = split_pixels(pixels)
    for i, image in enumerate(images):  # data loaders preprocess image by image
        one, row = (_fields(x) for x in (split_pixels(encoder.preprocess([image]))[0], rows[i]))
        assert one.keys() == row.keys() and all(
            torch.allclose(one[k].float(), row[k].float(), atol=1e-6) for k in row
        ), f"image {i} preprocessed alone differs from its row of the batch"
    try:
        encoder.preprocess([torch.rand(5, h, w)])
    except ValueError as e:
        assert "5" in str(e), f"the error for a 5-channel image should say what it got: {e}"
    else:
        raise AssertionError("preprocess accepted a 5-channel image")

    with torch.no_grad():
        a, b = encoder(pixels), encoder(pixels)
    want = (len(images), encoder.num_tokens, encoder.hidden_size)
    assert tuple(a.shape) == want, f"encoder output {tuple(a.shape)}, declared {want}"
    assert a.dtype == torch.float32, f"encoder tokens must be float32, got {a.dtype}"
    try:
        with torch.no_grad():
            encoder(torch.zeros(1, 3, h + 8, w + 8))
    except ValueError:
        pass
    else:
        raise AssertionError(f"encoder accepted pixel values of a size other than {(h, w)}")
    assert torch.allclose(a, b, atol=atol), "encoder is not deterministic in eval mode"
    assert torch.isfinite(a).all(), "encoder output has NaN/inf"
    if getattr(encoder, "normalize", True):
        norms = a.float().norm(dim=-1)
        assert torch.allclose(norms, torch.ones_like(norms), atol=1e-4), "tokens not L2-normalised"

    if encoder.frozen:
        params = list(encoder.parameters())
        assert not any(p.requires_grad for p in params), "frozen encoder has trainable parameters"
        was_training = encoder.training
        encoder.train()
        assert not encoder.training, "frozen encoder left eval mode on train()"
        encoder.train(was_training)
        with torch.enable_grad():
            assert encoder(_probe(pixels)).grad_fn is None, "frozen encoder built an autograd graph"

    low = copy.deepcopy(encoder).to(torch.bfloat16)
    with torch.no_grad():
        out = low(pixels)  # float32 pixels into bfloat16 weights
    assert tuple(out.shape) == want and torch.isfinite(out.float()).all(), "bfloat16 weights failed"
    cos = torch.nn.functional.cosine_similarity(out.float(), a.float(), dim=-1)
    assert cos.mean() > 0.95, (
        f"bfloat16 tokens disagree with float32 (mean cosine {cos.mean():.3f})"
    )
