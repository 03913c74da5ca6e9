"""``timm``: any timm ViT by name (including the ``*_siglip_*`` family) as a MetaMorph encoder.

``pretrained``: ``False`` (random init), ``True`` (timm's own pretrained weights, which timm
downloads), or a path to a ``.safetensors`` file or a directory holding ``model.safetensors``
(only safetensors: nothing is unpickled). ``model_kwargs`` go to ``timm.create_model`` (e.g.
``img_size``, ``depth`` for a small random model). Preprocessing comes from timm's data config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from metamorph_core.dtypes import resolve_dtype
from metamorph_core.errors import CheckpointError
from metamorph_encoders.base import GridEncoder
from metamorph_encoders.transforms import ImageTransform

WEIGHTS = "model.safetensors"


class TimmEncoder(GridEncoder):
    def __init__(
        self,
        model_name: str,
        pretrained: bool | str | Path = False,
        model_kwargs: dict[str, Any] | None = None,
        layer: int = -1,
        num_tokens: int | None = 64,
        reduction: str = "interpolate",
        normalize: bool = True,
        center: str | None = None,
        frozen: bool = True,
        drop_prefix_tokens: bool = True,
        dtype: str | torch.dtype = "float32",
        image_transform: dict[str, Any] | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        import timm

        if not timm.is_model(model_name) and not model_name.startswith(("hf-hub:", "hf_hub:")):
            known = timm.list_models("vit_*")[:12]
            raise ValueError(
                f"encoder 'timm': unknown model '{model_name}'; see timm.list_models(), e.g. {known}"
            )
        self.model_name, self.model_kwargs = model_name, dict(model_kwargs or {})
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            self.model = timm.create_model(
                model_name, pretrained=pretrained is True, num_classes=0, **self.model_kwargs
            )
        if not hasattr(self.model, "forward_intermediates") or not hasattr(self.model, "blocks"):
            raise ValueError(
                f"encoder 'timm': '{model_name}' is not a ViT with forward_intermediates"
            )
        if isinstance(pretrained, (str, Path)):
            self._load_weights(Path(pretrained))
        self.model.to(resolve_dtype(dtype))
        if image_transform is not None:
            transform = ImageTransform.from_dict(image_transform)
        else:
            data_config = timm.data.resolve_model_data_config(self.model)
            # the pretrained config names the preset's size; the model may be built for another
            data_config["input_size"] = (3, *self.model.patch_embed.img_size)
            transform = ImageTransform.from_timm(data_config)
        grid = tuple(self.model.patch_embed.dynamic_feat_size(transform.size))
        self._setup(
            num_layers=len(self.model.blocks),
            hidden_size=self.model.embed_dim,
            grid=grid,
            num_prefix_tokens=self.model.num_prefix_tokens,
            transform=transform,
            layer=layer,
            num_tokens=num_tokens,
            reduction=reduction,
            normalize=normalize,
            center=center,
            frozen=frozen,
            drop_prefix_tokens=drop_prefix_tokens,
            dtype=dtype,
            name="timm",
        )
        if layer == 0 or layer == -(len(self.model.blocks) + 1):
            n = len(self.model.blocks)
            raise ValueError(
                f"encoder 'timm': layer {layer} (the embeddings) is not available from timm; "
                f"use a block output: 1..{n} or -{n}..-1"
            )

    def _load_weights(self, path: Path) -> None:
        file = path / WEIGHTS if path.is_dir() else path
        if file.suffix != ".safetensors":
            raise CheckpointError(
                f"encoder 'timm': '{file}' is not a .safetensors file; convert the checkpoint to "
                "safetensors (nothing is unpickled)"
            )
        if not file.is_file():
            raise CheckpointError(f"encoder 'timm': no weights file at '{file}'")
        state = load_file(str(file))
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        if missing:
            raise CheckpointError(f"encoder 'timm': '{file}' lacks weights {sorted(missing)[:8]}")
        if unexpected and any(not k.startswith("head") for k in unexpected):
            raise CheckpointError(
                f"encoder 'timm': '{file}' has weights this '{self.model_name}' does not: "
                f"{sorted(unexpected)[:8]}"
            )

    def _layer_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        block = self.layer - 1 if self.layer > 0 else len(self.model.blocks) + self.layer
        out = self.model.forward_intermediates(
            pixel_values.to(next(self.model.parameters()).dtype),
            indices=[block],
            norm=False,
            stop_early=True,
            output_fmt="NLC",
            intermediates_only=True,
            return_prefix_tokens=True,
        )[0]
        if isinstance(out, tuple):  # (spatial, prefix)
            return torch.cat([out[1], out[0]], dim=1)
        return out

    def save_pretrained(self, directory: Path) -> dict[str, Any]:
        save_file(
            {k: v.contiguous() for k, v in self.model.state_dict().items()},
            str(directory / WEIGHTS),
        )
        return {
            "model_name": self.model_name,
            "model_kwargs": self.model_kwargs,
            **self.reload_kwargs(),
        }
