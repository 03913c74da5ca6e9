"""A tiny unified model trained for a few steps on a fixed set of conversations (text-to-image,
an image mid-answer, image-to-image, text-only, understanding, and the prompt-dropped
generation samples), so that its greedy choices are not near-ties. Tests of generation, of
decoders attached to a model and of commands use it."""

from __future__ import annotations

import torch

from metamorph_core.conversation import Conversation, Turn
from metamorph_core.testing.samples import random_image

RED = "generate an image of a red square"
BLUE = "a blue circle"
ANSWER = "here is an image based on your request: "
AGAIN = "the same again"


def solid(rgb: tuple[float, float, float]) -> torch.Tensor:
    """A ``(3, 16, 16)`` image of one colour."""
    return torch.tensor(rgb)[:, None, None].expand(3, 16, 16).clone()


def training_set() -> list[Conversation]:
    """The conversations :func:`train` fits."""
    gen = [
        Conversation([Turn("user", RED), Turn("assistant", ANSWER + "<image>")], [random_image(1)]),
        # the image mid-answer: text resumes after <image_end>
        Conversation(
            [Turn("user", BLUE), Turn("assistant", "sure: <image> a blue circle.")],
            [random_image(2)],
        ),
    ]
    edit = [  # image-to-image: the answer is the prompt's image again, so it must read it
        Conversation(
            [Turn("user", f"<image>\n{AGAIN}"), Turn("assistant", "<image>")],
            [solid(colour), solid(colour)],
        )
        for colour in ((0.9, 0.1, 0.1), (0.1, 0.9, 0.1))
    ]
    other = edit + [
        Conversation([Turn("user", "two plus three"), Turn("assistant", "five")]),
        Conversation(
            [
                Turn("user", "<image>\nwhat colour is the shape?"),
                Turn("assistant", "the shape is red."),
            ],
            [random_image(3)],
        ),
    ]
    return gen + other + [c.drop_prompt() for c in gen]  # prompt dropout: the uncond branch


def train(model: torch.nn.Module, steps: int = 60) -> torch.nn.Module:
    """``model`` (a :class:`~metamorph_core.model.MetaMorphModel`) after ``steps`` full-batch
    AdamW steps (lr 1e-2) on :func:`training_set`, in eval mode."""
    batch = model.prepare_batch(training_set())
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = model(**batch, return_logits=False).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()
