"""Small deterministic conversations for tests: one understanding turn, one generation turn,
one text-only turn. Images are random ``(3, size, size)`` tensors in [0, 1]."""

from __future__ import annotations

import torch

from metamorph_core.conversation import Conversation, Turn


def random_image(seed: int, size: int = 16) -> torch.Tensor:
    return torch.rand(3, size, size, generator=torch.Generator().manual_seed(seed))


def understanding(seed: int = 0, size: int = 16) -> Conversation:
    """A prompt image (context) and a text answer."""
    return Conversation(
        [
            Turn("user", "<image>\nWhat colour is the shape?"),
            Turn("assistant", "the shape is red."),
        ],
        [random_image(seed, size)],
        id=f"und-{seed}",
    )


def generation(seed: int = 1, size: int = 16) -> Conversation:
    """A text prompt and a generated image (visual target)."""
    return Conversation(
        [
            Turn("user", "generate an image of a red square"),
            Turn("assistant", "here is an image based on your request: <image>"),
        ],
        [random_image(seed, size)],
        id=f"gen-{seed}",
    )


def text_only() -> Conversation:
    return Conversation([Turn("user", "two plus three"), Turn("assistant", "five")], id="text")
