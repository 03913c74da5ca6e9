"""What a vision encoder's ``preprocess`` gives and its ``forward`` takes: a batch of pixels.

Most encoders read every image at one size and give one ``(b, 3, h, w)`` float tensor. An
encoder whose input is not a fixed-size image (SigLIP 2's NaFlex patches, which keep each
image's aspect ratio) gives a dict of named tensors instead, each holding the ``b`` images
along dim 0, every image with the same shape per field (the encoder pads inside
``preprocess``), e.g. ``{"pixel_values": (b, n, 3*p*p), "pixel_attention_mask": (b, n),
"spatial_shapes": (b, 2)}``. Data loaders preprocess one image at a time and the model stacks
them, so the code that holds pixels treats both kinds alike through these three functions:
:func:`split_pixels` (a batch -> one value per image), :func:`stack_pixels` (field by field
back) and :func:`move_pixels` (to a device).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

#: a batch of preprocessed images: ``(b, 3, h, w)``, or named tensors with ``b`` along dim 0
Pixels = torch.Tensor | Mapping[str, torch.Tensor]


def split_pixels(pixels: Pixels) -> list[Pixels]:
    """A batch -> one value per image: ``(3, h, w)`` tensors, or dicts of the per-image rows
    of every field."""
    if isinstance(pixels, torch.Tensor):
        return list(pixels)
    sizes = {name: len(value) for name, value in pixels.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(
            f"preprocessed fields must hold the same number of images along dim 0, got {sizes}"
        )
    (n,) = set(sizes.values())
    return [{name: value[i] for name, value in pixels.items()} for i in range(n)]


def stack_pixels(items: Sequence[Pixels]) -> Pixels:
    """One value per image (what :func:`split_pixels` gives) -> a batch: tensors stacked, dicts
    stacked field by field. Every image must have the same fields and, per field, one shape."""
    if not items:
        raise ValueError("cannot stack the pixels of zero images")
    if all(isinstance(x, torch.Tensor) for x in items):
        shapes = {tuple(x.shape) for x in items}
        if len(shapes) != 1:
            raise ValueError(
                f"preprocessed images have different shapes {sorted(shapes)}; an encoder's "
                "preprocess must give every image one shape (resize, or pad inside preprocess)"
            )
        return torch.stack(list(items))
    if not all(isinstance(x, Mapping) for x in items):
        kinds = sorted({type(x).__name__ for x in items})
        raise ValueError(
            f"cannot stack preprocessed images of different kinds ({', '.join(kinds)}); "
            "preprocess every image of a batch with the same encoder"
        )
    names = list(items[0])
    out = {}
    for name in names:
        values = []
        for i, item in enumerate(items):
            if set(item) != set(names):
                raise ValueError(
                    f"preprocessed image {i} has fields {list(item)} but image 0 has {names}; "
                    "preprocess every image of a batch with the same encoder"
                )
            values.append(item[name])
        shapes = {tuple(v.shape) for v in values}
        if len(shapes) != 1:
            raise ValueError(
                f"preprocessed field '{name}' has different shapes {sorted(shapes)} across "
                "images; an encoder's preprocess must pad each field to one shape"
            )
        out[name] = torch.stack(values)
    return out


def move_pixels(
    pixels: Pixels, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> Pixels:
    """``pixels`` on ``device``; ``dtype`` converts floating-point tensors only (masks and
    shapes keep their integer types)."""

    def move(x: torch.Tensor) -> torch.Tensor:
        return x.to(device=device, dtype=dtype if x.is_floating_point() else None)

    if isinstance(pixels, torch.Tensor):
        return move(pixels)
    return {name: move(value) for name, value in pixels.items()}
