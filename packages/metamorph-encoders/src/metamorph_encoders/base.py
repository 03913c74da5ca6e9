"""Shared behaviour of patch-grid vision encoders: layer choice, prefix-token dropping, grid
reduction, L2 normalisation and freezing. A concrete encoder supplies the backbone call."""

from __future__ import annotations

from abc import abstractmethod
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from metamorph_core.dtypes import dtype_name, resolve_dtype
from metamorph_core.interfaces import VisionEncoder
from metamorph_core.pixels import move_pixels
from metamorph_core.vision import REDUCTIONS, reduce_grid
from metamorph_encoders.transforms import ImageTransform


class GridEncoder(VisionEncoder):
    """A ViT-style encoder whose chosen layer holds ``prefix + h*w`` tokens.

    Options (every encoder): ``layer`` (hidden-state index: 0 = embeddings, ``i`` = output of
    block ``i``, ``-1`` = last block, *before* any final norm), ``drop_prefix_tokens`` (class /
    register tokens), ``num_tokens`` and ``reduction`` (``interpolate`` as the paper,
    ``avgpool``, ``none``), ``normalize`` (L2, default on), ``center`` (a ``.safetensors`` file
    whose ``token_mean``, ``(num_tokens, c)`` per token or ``(1, c)`` one for all, is
    subtracted before the L2 normalisation: for small encoders whose tokens share a dominant
    direction, see :func:`token_mean`),
    ``frozen`` (default on: no grads, eval mode, run under no-grad). Tokens are returned in
    float32.
    """

    def _setup(
        self,
        *,
        num_layers: int,
        hidden_size: int,
        grid: tuple[int, int],
        num_prefix_tokens: int,
        transform: ImageTransform,
        layer: int,
        num_tokens: int | None,
        reduction: str,
        normalize: bool,
        frozen: bool,
        center: str | None = None,
        drop_prefix_tokens: bool,
        dtype: str | torch.dtype,
        name: str,
    ) -> None:
        if not -(num_layers + 1) <= layer <= num_layers:
            raise ValueError(
                f"encoder '{name}': layer {layer} is out of range; this model has {num_layers} "
                f"blocks, so layer must be in [{-(num_layers + 1)}, {num_layers}] (0 is the "
                "embeddings, -1 the last block)"
            )
        if reduction not in REDUCTIONS:
            raise ValueError(
                f"encoder '{name}': unknown reduction '{reduction}'; use one of {REDUCTIONS}"
            )
        if not drop_prefix_tokens and reduction != "none":
            raise ValueError(
                f"encoder '{name}': keeping prefix (class/register) tokens needs reduction='none'; "
                "a grid reduction cannot place them"
            )
        grid_tokens = grid[0] * grid[1]
        kept = grid_tokens + (0 if drop_prefix_tokens else num_prefix_tokens)
        if num_tokens is None:
            num_tokens = kept if reduction == "none" else grid_tokens
        if reduction == "none" and num_tokens != kept:
            raise ValueError(
                f"encoder '{name}': reduction 'none' keeps {kept} tokens ({grid[0]}x{grid[1]} "
                f"patches{'' if drop_prefix_tokens else f' + {num_prefix_tokens} prefix'}), but "
                f"num_tokens={num_tokens}; set num_tokens={kept} or pick reduction="
                "'interpolate' or 'avgpool'"
            )
        if reduction != "none":
            reduce_grid(torch.zeros(1, grid_tokens, 1), grid, num_tokens, reduction)  # validates
        self.name, self.grid, self.transform = name, grid, transform
        self.hidden_size, self.num_prefix_tokens = int(hidden_size), num_prefix_tokens
        self.num_layers, self.layer = num_layers, layer
        self.num_tokens, self.reduction = num_tokens, reduction
        self.normalize, self.frozen, self.drop_prefix_tokens = normalize, frozen, drop_prefix_tokens
        self.image_size = transform.size
        self.center = center
        if center is not None:
            from safetensors.torch import load_file

            mean = load_file(str(center)).get("token_mean")
            shapes = ((num_tokens, int(hidden_size)), (1, int(hidden_size)))
            if mean is None or tuple(mean.shape) not in shapes:
                raise ValueError(
                    f"encoder '{name}': center file '{center}' must hold 'token_mean' of shape "
                    f"({num_tokens}, {hidden_size}) (this encoder's tokens) or (1, {hidden_size}) "
                    "(one mean for all); make it with metamorph_encoders.base.token_mean"
                )
            self.register_buffer("token_mean", mean.float(), persistent=False)
        self.requires_grad_(not frozen)
        if frozen:
            self.eval()
        self._options = {
            "layer": layer,
            "num_tokens": num_tokens,
            "reduction": reduction,
            "normalize": normalize,
            "frozen": frozen,
            "drop_prefix_tokens": drop_prefix_tokens,
            "center": center,
            "dtype": dtype_name(resolve_dtype(dtype)),
            "image_transform": transform.to_dict(),
        }

    @abstractmethod
    def _layer_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(b, 3, h, w)`` -> ``(b, prefix + grid tokens, c)`` at ``self.layer``."""

    def preprocess(self, images: Any) -> torch.Tensor:
        return self.transform(images)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (3, *self.image_size):
            raise ValueError(
                f"encoder '{self.name}' expects pixel_values of shape (b, 3, {self.image_size[0]}, "
                f"{self.image_size[1]}), got {tuple(pixel_values.shape)}; use encoder.preprocess(images)"
            )
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            x = self._layer_tokens(pixel_values)
            grid_tokens = self.grid[0] * self.grid[1]
            prefix = x.shape[1] - grid_tokens
            if prefix != self.num_prefix_tokens:
                raise ValueError(
                    f"encoder '{self.name}' gave {x.shape[1]} tokens, expected "
                    f"{self.num_prefix_tokens} prefix + {self.grid[0]}x{self.grid[1]} grid tokens; "
                    "the checkpoint's layout differs from what this encoder class assumes"
                )
            if self.drop_prefix_tokens:
                x = reduce_grid(x[:, prefix:], self.grid, self.num_tokens, self.reduction)
            return self._finish(x)

    def _finish(self, tokens: torch.Tensor) -> torch.Tensor:
        """Reduced tokens ``(b, num_tokens, c)`` -> float32, centred and L2-normalised as set."""
        x = tokens.float()
        if self.center is not None:
            x = x - self.token_mean
        return F.normalize(x, p=2, dim=-1) if self.normalize else x

    def reload_kwargs(self) -> dict[str, Any]:
        """Options that rebuild this encoder, as it is now, around weights saved next to them."""
        param = next(self.parameters(), None)
        dtype = dtype_name(param.dtype) if param is not None else self._options["dtype"]
        return {**self._options, "dtype": dtype, "frozen": self.frozen}


@torch.no_grad()
def token_mean(
    encoder: GridEncoder,
    images: Any,
    path: str | Path,
    batch_size: int = 256,
    per_token: bool = True,
) -> Path:
    """Write the mean token of ``encoder`` (built without ``center``) over ``images`` to
    ``path`` (safetensors, key ``token_mean``), for the ``center`` option: ``(num_tokens, c)``,
    each token position's own mean, or with ``per_token=False`` ``(1, c)``, one mean over every
    position. A per-position mean also subtracts what the encoder's position embeddings add
    to each position alike, which is most of what a token says about *where* it is (measured
    on the toy world's 3x3-token encoder: a linear probe reads the object's cell from its
    token 0.985 of the time raw or centred by one mean, 0.598 centred per position)."""
    from safetensors.torch import save_file

    if encoder.center is not None or encoder.normalize:
        raise ValueError(
            "compute the token mean with an encoder built with center=None and normalize=False "
            "(the mean is of the tokens before normalisation)"
        )
    total, count = None, 0
    for start in range(0, len(images), batch_size):
        chunk = encoder.preprocess(images[start : start + batch_size])
        x = encoder(move_pixels(chunk, next(encoder.parameters()).device))
        if not per_token:
            x = x.reshape(-1, 1, x.shape[-1])
        total = x.sum(0) if total is None else total + x.sum(0)
        count += x.shape[0]
    if total is None:
        raise ValueError("token_mean needs at least one image")
    path = Path(path)
    save_file({"token_mean": (total / count).contiguous().cpu()}, str(path))
    return path
