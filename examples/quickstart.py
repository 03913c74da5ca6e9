"""Quick start: assemble a small unified model by component names, train a few VPiT steps on
image-understanding and image-generation turns, save it, reload it, check the reload.

    make demo            # or: .venv/bin/python examples/quickstart.py [--steps 40] [--out DIR]

Everything is built offline: a tiny tokenizer and a random Llama-style backbone stand in for a
pretrained LLM, and the core's `tiny-patch` encoder stands in for SigLIP.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import transformers

from metamorph_core import Conversation, MetaMorphModel
from metamorph_core.conversation import Turn
from metamorph_core.testing import build_tiny_tokenizer

COLOURS = {
    "red": (0.9, 0.1, 0.1),
    "green": (0.1, 0.8, 0.2),
    "blue": (0.1, 0.2, 0.9),
    "yellow": (0.95, 0.9, 0.1),
}
PLACES = {"left": (4, 4), "right": (4, 18)}


def square(colour: str, place: str) -> torch.Tensor:
    """A 32x32 grey image with a coloured 10x10 square: ``(3, 32, 32)`` in [0, 1]."""
    img = torch.full((3, 32, 32), 0.5)
    y, x = PLACES[place]
    img[:, y + 6 : y + 16, x : x + 10] = torch.tensor(COLOURS[colour])[:, None, None]
    return img


def samples() -> list[Conversation]:
    out = []
    for colour in COLOURS:
        for place in PLACES:
            img = square(colour, place)
            out.append(
                Conversation(  # understanding: the image is context
                    [
                        Turn("user", "<image>\nWhat colour is the square?"),
                        Turn("assistant", f"The square is {colour}."),
                    ],
                    [img],
                )
            )
            out.append(
                Conversation(  # generation: the image is a target
                    [
                        Turn("user", f"Generate an image of a {colour} square on the {place}."),
                        Turn("assistant", "Here is an image based on your request: <image>"),
                    ],
                    [img],
                )
            )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--out", type=Path, default=Path("runs/quickstart"))
    parser.add_argument("--device", default="cpu", help="e.g. cuda")
    args = parser.parse_args()
    torch.manual_seed(0)
    transformers.utils.logging.disable_progress_bar()

    tokenizer_dir = args.out / "tokenizer"
    build_tiny_tokenizer("llama").save_pretrained(str(tokenizer_dir))
    config = {  # every component by its registry name
        "encoder": {
            "name": "tiny-patch",
            "kwargs": {"image_size": 32, "patch_size": 4, "hidden_size": 32, "num_tokens": 16},
        },
        "projector": "mlp2x_gelu",
        "backbone": {
            "name": "llama",
            "kwargs": {
                "tokenizer": str(tokenizer_dir),
                "seed": 0,
                "dtype": "float32",
                "config": {
                    "model_type": "llama",
                    "vocab_size": len(build_tiny_tokenizer("llama")),
                    "hidden_size": 64,
                    "intermediate_size": 128,
                    "num_hidden_layers": 2,
                    "num_attention_heads": 4,
                    "num_key_value_heads": 2,
                    "max_position_embeddings": 256,
                },
            },
        },
        "head": "mlp",
        "visual_loss": "cosine",
        "template": "llama3",
    }
    model = MetaMorphModel.from_config(config).to(args.device)
    batch = model.prepare_batch(samples())  # tensors on the model's device
    print(
        f"model: {sum(p.numel() for p in model.parameters() if p.requires_grad):,} trainable "
        f"parameters; batch: {batch['input_ids'].shape[0]} samples, "
        f"{int(batch['target_slot_mask'].any(1).sum())} with a generation target"
    )

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    history = []
    for step in range(1, args.steps + 1):
        out = model(**batch, return_logits=False)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        history.append((out.text_loss.item(), out.visual_loss.item()))
        if step == 1 or step % 5 == 0:
            print(
                f"step {step:3d}  text loss {history[-1][0]:.4f}  visual loss {history[-1][1]:.4f}"
            )

    model.eval()
    with torch.no_grad():
        before = model(**batch)
    path = model.save_pretrained(args.out / "model")
    reloaded = MetaMorphModel.from_pretrained(path).to(args.device).eval()
    with torch.no_grad():
        after = reloaded(**batch)
    print(f"saved to {path}")
    print(f"loss before save {before.loss.item():.6f}, after reload {after.loss.item():.6f}")

    falling = history[-1][0] < history[0][0] and history[-1][1] < history[0][1]
    same = torch.equal(before.loss, after.loss)
    print(f"losses fell: {falling}; reload gives the same loss: {same}")
    return 0 if falling and same else 1


if __name__ == "__main__":
    sys.exit(main())
