"""Train a small pixel-space visual decoder on an encoder's tokens and look at what it draws.

    .venv/bin/python examples/train_decoder.py [--steps 800] [--out runs/decoder]   # ~4 min on 2 CPU cores

Images are generated on the fly (coloured squares, discs and bars on a grey background). The
frozen `tiny-patch` encoder turns each into 16 tokens; the `sd-unet` decoder (a small diffusers
UNet in pixel space, the paper's MLP adapter, conditioning dropout 0.1) learns to draw the image
back from them. The script writes `reconstructions.png`: originals on the top row, samples from
their tokens below (DDIM, 50 steps, guidance 2), and saves the decoder in the SD layout.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from PIL import Image

from metamorph_core import create

COLOURS = torch.tensor([[0.9, 0.1, 0.1], [0.1, 0.7, 0.2], [0.15, 0.25, 0.9], [0.95, 0.85, 0.1]])


def shapes(n: int, gen: torch.Generator) -> torch.Tensor:
    """``(n, 3, 32, 32)`` in [0, 1]: one coloured square, disc or bar per image."""
    yy, xx = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    out = torch.full((n, 3, 32, 32), 0.5)
    for i in range(n):
        kind = int(torch.randint(0, 3, (1,), generator=gen))
        cy, cx = (int(v) for v in torch.randint(9, 23, (2,), generator=gen))
        colour = COLOURS[int(torch.randint(0, len(COLOURS), (1,), generator=gen))]
        if kind == 0:
            mask = ((yy - cy).abs() <= 6) & ((xx - cx).abs() <= 6)
        elif kind == 1:
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= 49
        else:
            mask = ((yy - cy).abs() <= 3) & ((xx - cx).abs() <= 9)
        out[i][:, mask] = colour[:, None]
    return out


def grid(rows: list[torch.Tensor], scale: int = 4) -> Image.Image:
    """Rows of ``(n, 3, h, w)`` images -> one PIL image, each pixel ``scale`` x ``scale``."""
    body = torch.cat([torch.cat(list(r), dim=2) for r in rows], dim=1)  # (3, rows*h, n*w)
    arr = (body.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    img = Image.fromarray(arr)
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("runs/decoder"))
    parser.add_argument("--prediction-type", default="v", choices=["epsilon", "v", "sample"])
    parser.add_argument("--sample-steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=2.0)
    args = parser.parse_args()
    torch.manual_seed(0)
    encoder = create(
        "encoder", "tiny-patch", image_size=32, patch_size=4, hidden_size=32, num_tokens=16, seed=0
    )
    decoder = create(
        "decoder",
        "sd-unet",
        token_dim=encoder.hidden_size,
        num_tokens=encoder.num_tokens,
        unet_config={
            # cross-attention only at 8x8: attention over 32x32 pixels is what makes small
            # UNets slow on a CPU
            "sample_size": 32,
            "in_channels": 3,
            "out_channels": 3,
            "layers_per_block": 1,
            "block_out_channels": (32, 64, 64),
            "cross_attention_dim": 64,
            "attention_head_dim": 8,
            "norm_num_groups": 8,
            "down_block_types": ("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        },
        adapter={"name": "mlp", "kwargs": {"hidden_dims": [128]}},
        context_length=16,
        cond_dropout=0.1,
        prediction_type=args.prediction_type,
        seed=0,
    )
    optimizer = torch.optim.AdamW([p for p in decoder.parameters() if p.requires_grad], lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    start = time.time()
    for step in range(1, args.steps + 1):
        images = shapes(args.batch_size, gen)
        with torch.no_grad():
            tokens = encoder(encoder.preprocess(images))
        loss = decoder.training_step(tokens, images, optimizer)
        if step == 1 or step % 100 == 0:
            print(f"step {step:4d}  loss {loss:.4f}  ({time.time() - start:.0f}s)")
    decoder.eval()
    originals = shapes(8, torch.Generator().manual_seed(1234))  # not seen in training
    with torch.no_grad():
        tokens = encoder(encoder.preprocess(originals))
    samples = decoder.decode(tokens, steps=args.sample_steps, guidance_scale=args.guidance, seed=0)
    err = (samples - originals).abs().mean().item()
    args.out.mkdir(parents=True, exist_ok=True)
    grid([originals, samples]).save(args.out / "reconstructions.png")
    decoder.save_pretrained(args.out / "decoder")
    print(f"mean absolute pixel error of the reconstructions: {err:.3f}")
    print(
        f"wrote {args.out / 'reconstructions.png'} (top: originals, bottom: decoded) and "
        f"{args.out / 'decoder'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
