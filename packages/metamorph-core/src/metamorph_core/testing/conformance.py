"""Conformance checks that any component plugin can run in its own tests."""

from __future__ import annotations

import torch

from metamorph_core.interfaces import VisionEncoder


def check_encoder(encoder: VisionEncoder, batch_size: int = 2, atol: float = 1e-6) -> None:
    """Assert that ``encoder`` honours the :class:`VisionEncoder` contract: declared shapes,
    determinism, frozen parameters, L2-normalised tokens (when it normalises)."""
    assert isinstance(encoder, VisionEncoder), f"{type(encoder).__name__} is not a VisionEncoder"
    for attr in ("hidden_size", "num_tokens", "image_size"):
        assert hasattr(encoder, attr), f"encoder must declare {attr}"
    h, w = encoder.image_size
    g = torch.Generator().manual_seed(0)
    images = torch.rand(batch_size, 3, h + 3, w + 5, generator=g)  # off-size: preprocess resizes
    pixels = encoder.preprocess(images)
    assert pixels.shape[0] == batch_size and pixels.shape[1] == 3, f"preprocess gave {pixels.shape}"
    with torch.no_grad():
        a, b = encoder(pixels), encoder(pixels)
    want = (batch_size, encoder.num_tokens, encoder.hidden_size)
    assert tuple(a.shape) == want, f"encoder output {tuple(a.shape)}, declared {want}"
    assert torch.allclose(a, b, atol=atol), "encoder is not deterministic in eval mode"
    assert torch.isfinite(a).all(), "encoder output has NaN/inf"
    if getattr(encoder, "normalize", True):
        norms = a.float().norm(dim=-1)
        assert torch.allclose(norms, torch.ones_like(norms), atol=1e-4), "tokens not L2-normalised"
    if getattr(encoder, "frozen", True) and any(True for _ in encoder.parameters()):
        assert not any(p.requires_grad for p in encoder.parameters()), "frozen encoder has grads"
