"""``open_clip``: the image tower of an open_clip model as a MetaMorph encoder: open_clip's own
ViTs (CLIP, CLIPA, CoCa ...) and ModifiedResNets (RN50 ...), and its towers on timm models
(ConvNeXt, SigLIP, EVA, ViTamin, MobileCLIP ...). Needs ``pip install
'metamorph-encoders[open_clip]'``. Only the image tower is built, never the text tower.

The architecture is ``model_name`` (an open_clip config, ``open_clip.list_models()``:
``ViT-B-32``, ``convnext_base_w``, ``RN50``, ...), or ``model_cfg`` (an open_clip model config as
a dict: ``embed_dim``, ``vision_cfg``, optionally ``quick_gelu``; other keys such as
``text_cfg`` are ignored), or, when neither is given, the ``open_clip_config.json`` that
``pretrained`` holds. ``vision_cfg`` overrides fields of the architecture's vision config.

``pretrained``:

- ``None``: random weights (``seed`` makes them reproducible);
- a pretrained tag of ``model_name`` (``open_clip.list_pretrained_tags_by_model``): read from
  the Hub repo open_clip names for that tag, with the tag's preprocessing;
- a ``.safetensors`` file, or a directory holding ``open_clip_model.safetensors``,
  ``open_clip_pytorch_model.safetensors`` or ``model.safetensors`` (first found; and optionally
  ``open_clip_config.json``);
- a Hub repo id (``laion/CLIP-ViT-B-32-laion2B-s34B-b79K``), resolved by
  :func:`metamorph_core.hub.resolve_pretrained` through the Hugging Face cache (with
  ``HF_HUB_OFFLINE=1`` nothing is fetched; a repo missing from the cache is a
  ``CheckpointError`` naming it).

The weights are a whole open_clip model's state dict (its ``visual.`` keys are taken) or the
image tower's alone. Only safetensors are read: nothing is unpickled (convert ``.bin`` / ``.pt``
files first).

Tokens, at ``layer`` (``-1``: the last block or stage, before the final norm, pooling and
projection):

- open_clip ViTs: the output of block ``layer`` (``1``..``n``, or ``-n``..``-1``): one class
  token, dropped by default, and the patch grid. The embeddings (``layer=0``) are not offered.
- ModifiedResNets: feature maps as the ``timm`` encoder reads CNNs
  (:mod:`metamorph_encoders.feature_maps`), over 5 stages: ``1`` the stem, ``2``..``5`` its
  ``layer1``..``layer4`` (``-1`` is ``layer4``, before the attention pool).
- towers on timm models: the timm trunk read exactly as the ``timm`` encoder reads a timm model
  (:func:`~metamorph_encoders.timm_encoder.timm_tokens`: ViT blocks, or feature-stage maps),
  before the tower's pooling and projection head.

Patch dropout is switched off (every patch is read). Preprocessing is open_clip's eval
transform from the preprocess config (the pretrained tag's, else ``open_clip_config.json``'s,
else open_clip's defaults: OpenAI mean and std, bicubic shortest-edge resize and centre crop)
at the tower's image size; ``image_transform`` replaces it. ViT towers are built for one image
size: preprocessing must give that size.
"""

from __future__ import annotations

import logging
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from metamorph_core.dtypes import resolve_dtype
from metamorph_core.errors import CheckpointError
from metamorph_encoders.base import GridEncoder
from metamorph_encoders.feature_maps import StageMaps
from metamorph_encoders.open_clip_source import NAME, WEIGHTS, architecture, find_source
from metamorph_encoders.timm_encoder import TimmVitTokens, timm_tokens
from metamorph_encoders.transforms import ImageTransform

logger = logging.getLogger("metamorph")

INSTALL_HINT = "pip install 'metamorph-encoders[open_clip]'"


class OpenClipEncoder(GridEncoder):
    def __init__(
        self,
        model_name: str | None = None,
        pretrained: str | Path | None = None,
        model_cfg: dict[str, Any] | None = None,
        vision_cfg: dict[str, Any] | None = None,
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
        open_clip = import_open_clip()
        source = find_source(pretrained, model_name, open_clip)
        self.model_cfg = architecture(model_name, model_cfg, vision_cfg, source, open_clip)
        # the architecture, as messages name it
        label = model_name or ("model_cfg" if model_cfg is not None else str(pretrained))
        if source.quick_gelu not in (None, self.model_cfg["quick_gelu"]):
            logger.warning(
                "encoder '%s': pretrained '%s' was trained with quick_gelu=%s but '%s' builds "
                "quick_gelu=%s (open_clip names such variants '<name>-quickgelu'); its tokens "
                "will differ from the original model's",
                NAME,
                pretrained,
                source.quick_gelu,
                label,
                self.model_cfg["quick_gelu"],
            )
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            self.model = _build_tower(self.model_cfg, label)
        if source.weights is not None:
            _load_tower(self.model, source.weights, label)
        self.model.to(resolve_dtype(dtype))

        if image_transform is not None:
            transform = ImageTransform.from_dict(image_transform)
        else:
            from open_clip.transform import PreprocessCfg, merge_preprocess_dict

            preprocess = merge_preprocess_dict(PreprocessCfg(), source.preprocess)
            preprocess["size"] = self.model.image_size
            transform = ImageTransform.from_open_clip(preprocess)
        self.is_timm = hasattr(self.model, "trunk")  # open_clip's TimmModel
        native = None  # the one image size a ViT is built for
        if self.is_timm:
            trunk = self.model.trunk
            self.reader: TimmVitTokens | StageMaps | _VitTokens = timm_tokens(
                trunk,
                layer,
                transform.size,
                drop_prefix_tokens=drop_prefix_tokens,
                name=NAME,
                model_name=label,
            )
            if isinstance(self.reader, TimmVitTokens) and not getattr(trunk, "dynamic_img_size", 0):
                native = trunk.patch_embed.img_size
        elif hasattr(self.model, "transformer"):  # open_clip's VisionTransformer
            self.reader = _VitTokens(self.model, layer)
            native = self.model.image_size
        else:  # ModifiedResNet: the stem and layer1..layer4
            self.reader = StageMaps(
                _resnet_stage_map,
                self.model,
                layer,
                5,
                transform.size,
                drop_prefix_tokens=drop_prefix_tokens,
                name=NAME,
                model_name=label,
            )
        if native is not None and tuple(transform.size) != tuple(native):
            raise ValueError(
                f"encoder '{NAME}': preprocessing gives {transform.size[0]}x{transform.size[1]} "
                f"images but the '{label}' tower is built for {native[0]}x{native[1]}; pass "
                "image_transform= of that size (a timm trunk's size comes with its "
                "timm_model_name, whatever vision_cfg's image_size says)"
            )
        self._setup(
            num_layers=self.reader.num_layers,
            hidden_size=self.reader.hidden_size,
            grid=self.reader.grid,
            num_prefix_tokens=self.reader.num_prefix_tokens,
            transform=transform,
            layer=layer,
            num_tokens=num_tokens,
            reduction=reduction,
            normalize=normalize,
            center=center,
            frozen=frozen,
            drop_prefix_tokens=drop_prefix_tokens,
            dtype=dtype,
            name=NAME,
        )

    def _layer_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pixel_values = pixel_values.to(next(self.model.parameters()).dtype)
        return self.reader(self.model.trunk if self.is_timm else self.model, pixel_values)

    def save_pretrained(self, directory: Path) -> dict[str, Any]:
        save_file(
            {k: v.contiguous() for k, v in self.model.state_dict().items()},
            str(directory / WEIGHTS),
        )
        return {"model_cfg": self.model_cfg, **self.reload_kwargs()}


def import_open_clip() -> Any:
    """The ``open_clip`` module, or an ``ImportError`` saying how to install it."""
    try:
        import open_clip
    except ImportError as e:
        raise ImportError(
            f"encoder '{NAME}' needs the open_clip library (open-clip-torch), which "
            f"metamorph-encoders does not install by default: {INSTALL_HINT}"
        ) from e
    return open_clip


class _VitTokens:
    """open_clip's ``VisionTransformer``: block outputs, one class token + the patch grid."""

    num_prefix_tokens = 1

    def __init__(self, tower: torch.nn.Module, layer: int) -> None:
        self.num_layers = len(tower.transformer.resblocks)
        if layer == 0 or layer == -(self.num_layers + 1):
            raise ValueError(
                f"encoder '{NAME}': layer {layer} (the embeddings) is not offered; use a block "
                f"output: 1..{self.num_layers} or -{self.num_layers}..-1"
            )
        self.block = layer - 1 if layer > 0 else self.num_layers + layer
        self.grid, self.hidden_size = tuple(tower.grid_size), tower.transformer.width

    def __call__(self, tower: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        out = tower.forward_intermediates(
            pixel_values,
            indices=[self.block],
            stop_early=True,
            intermediates_only=True,
            output_fmt="NLC",
            output_extra_tokens=True,
        )
        return torch.cat([out["image_intermediates_prefix"][0], out["image_intermediates"][0]], 1)


def _resnet_stage_map(
    tower: torch.nn.Module, pixel_values: torch.Tensor, stage: int
) -> torch.Tensor:
    """open_clip's ``ModifiedResNet``: the map of its stem (stage 0) or residual stage 1..4."""
    out = tower.forward_intermediates(
        pixel_values, indices=[stage], stop_early=True, intermediates_only=True
    )
    return out["image_intermediates"][0]


def _build_tower(arch: dict[str, Any], label: str) -> torch.nn.Module:
    from open_clip.model import CLIPVisionCfg, _build_vision_tower

    vision = {**arch["vision_cfg"], "patch_dropout": 0.0}
    if vision.get("timm_model_pretrained"):
        raise ValueError(
            f"encoder '{NAME}': vision_cfg timm_model_pretrained=True would fetch timm's weights "
            "for the trunk alone; the tower's weights come from pretrained= (for a timm model's "
            "own weights use the 'timm' encoder)"
        )
    known = {f.name for f in fields(CLIPVisionCfg)}
    if unknown := sorted(set(vision) - known):
        raise ValueError(
            f"encoder '{NAME}': the vision_cfg of '{label}' has unknown fields {unknown}; "
            f"open_clip's are {sorted(known)}"
        )
    tower = _build_vision_tower(
        arch["embed_dim"], CLIPVisionCfg(**vision), quick_gelu=arch["quick_gelu"]
    )
    if not isinstance(tower.image_size, tuple):  # ModifiedResNet keeps the int it was given
        size = tower.image_size
        tower.image_size = (size, size) if isinstance(size, int) else tuple(size)
    return tower


def _load_tower(tower: torch.nn.Module, file: Path, label: str) -> None:
    try:
        state = load_file(str(file))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise CheckpointError(
            f"encoder '{NAME}': '{file}' is not a readable safetensors file: {e}"
        ) from e
    if any(k.startswith("visual.") for k in state):  # a whole CLIP model: take its image tower
        state = {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")}
    try:
        missing, unexpected = tower.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shapes that differ
        raise CheckpointError(
            f"encoder '{NAME}': the weights in '{file}' do not fit the '{label}' tower: {e}"
        ) from e
    if missing or unexpected:
        raise CheckpointError(
            f"encoder '{NAME}': '{file}' does not hold the '{label}' tower: it lacks "
            f"{sorted(missing)[:8]} and has {sorted(unexpected)[:8]} besides; is it an open_clip "
            "checkpoint of this architecture?"
        )
