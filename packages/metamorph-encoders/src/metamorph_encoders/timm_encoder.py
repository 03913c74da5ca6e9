"""``timm``: a timm model by name as a MetaMorph encoder: any ViT (including the ``*_siglip_*``
family) or any model whose feature stages are spatial maps (ConvNeXt, EfficientNet, MobileNet,
ResNet, RegNet, ...).

``pretrained``: ``False`` (random init), ``True`` (timm's own pretrained weights, which timm
fetches from the Hub or its cache), or a path to a ``.safetensors`` file or a directory holding
``model.safetensors`` (only safetensors: nothing is unpickled). ``model_kwargs`` go to
``timm.create_model`` (e.g. ``img_size``, ``depth`` for a small random ViT). Preprocessing comes
from timm's data config, at the size the model is built for.

``layer`` depends on the model's layout:

- ViTs (``patch_embed``, ``blocks`` and prefix tokens): a hidden state as for every encoder
  (``i`` = output of block ``i``, ``-1`` the last block, before the final norm).
- Every other model is read through timm's feature-extraction API (``forward_intermediates``,
  whose stages are the model's ``feature_info`` levels): ``i`` = the ``(b, c, h, w)`` map of
  stage ``i`` (1-based: ``1`` is ``feature_info[0]``, the stem for ResNets; ``-1`` the last
  stage, ``-2`` the one before), before any final norm, head convolution or pooling.
  ``hidden_size`` is that stage's ``c``; its ``h x w`` grid (measured once when the encoder is
  built; square or not) is flattened row by row into ``h*w`` tokens, which ``reduction`` and
  ``num_tokens`` treat as a ViT's patch grid (``interpolate`` and ``avgpool`` resample it to a
  square ``num_tokens``, ``none`` keeps ``h*w``). The input size is the data config's:
  ``model_kwargs={"pretrained_cfg_overlay": {"input_size": (3, h, w)}}`` changes it (and timm
  builds a model made for one size, such as a Swin, for it), as does ``img_size``; or pass
  ``image_transform``.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from metamorph_core.dtypes import resolve_dtype
from metamorph_core.errors import CheckpointError
from metamorph_encoders.base import GridEncoder
from metamorph_encoders.feature_maps import StageMaps
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

        hub_name = model_name.startswith(("hf-hub:", "hf_hub:"))
        if not timm.is_model(model_name) and not hub_name:
            known = timm.list_models("vit_*")[:6] + timm.list_models("convnext_*")[:6]
            raise ValueError(
                f"encoder 'timm': unknown model '{model_name}'; see timm.list_models(), e.g. {known}"
            )
        self.model_name, self.model_kwargs = model_name, dict(model_kwargs or {})
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            try:
                self.model = timm.create_model(
                    model_name, pretrained=pretrained is True, num_classes=0, **self.model_kwargs
                )
            except OSError as e:  # the Hub or a URL could not be reached, or is not cached
                if pretrained is not True and not hub_name:
                    raise
                raise CheckpointError(_fetch_failed(model_name, e)) from e
        if not hasattr(self.model, "forward_intermediates"):
            raise ValueError(
                f"encoder 'timm': '{model_name}' ({type(self.model).__name__}) has no "
                "forward_intermediates, timm's feature-extraction API through which this encoder "
                "reads feature maps; pick a model that has it (timm's own models do) or add it"
            )
        if isinstance(pretrained, (str, Path)):
            self._load_weights(Path(pretrained))
        self.model.to(resolve_dtype(dtype))
        is_vit = _is_token_vit(self.model)
        if image_transform is not None:
            transform = ImageTransform.from_dict(image_transform)
        else:
            data_config = timm.data.resolve_model_data_config(self.model)
            # the pretrained config names the preset's size; the model may be built for another
            if is_vit:
                data_config["input_size"] = (3, *self.model.patch_embed.img_size)
            elif "img_size" in self.model_kwargs:
                size = self.model_kwargs["img_size"]
                data_config["input_size"] = (3, *((size, size) if isinstance(size, int) else size))
            transform = ImageTransform.from_timm(data_config)
        self.reader = timm_tokens(
            self.model,
            layer,
            transform.size,
            drop_prefix_tokens=drop_prefix_tokens,
            name="timm",
            model_name=model_name,
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
            name="timm",
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
        classifier = getattr(self.model, "pretrained_cfg", {}).get("classifier") or ()
        heads = ("head", *((classifier,) if isinstance(classifier, str) else classifier))
        if unexpected and any(not k.startswith(heads) for k in unexpected):
            raise CheckpointError(
                f"encoder 'timm': '{file}' has weights this '{self.model_name}' does not: "
                f"{sorted(k for k in unexpected if not k.startswith(heads))[:8]}"
            )

    def _layer_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pixel_values = pixel_values.to(next(self.model.parameters()).dtype)
        return self.reader(self.model, pixel_values)

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


def timm_tokens(
    model: torch.nn.Module,
    layer: int,
    size: tuple[int, int],
    *,
    drop_prefix_tokens: bool,
    name: str,
    model_name: str,
) -> TimmVitTokens | StageMaps:
    """How the tokens of timm model ``model`` at ``layer`` are read (see the module docstring):
    a ViT's block output (:class:`TimmVitTokens`) or a feature stage's map
    (:class:`~metamorph_encoders.feature_maps.StageMaps` over ``feature_info``). Either has the
    ``num_layers``, ``hidden_size``, ``grid`` and ``num_prefix_tokens`` that
    :meth:`~metamorph_encoders.base.GridEncoder._setup` takes, and called with the model and
    ``(b, 3, h, w)`` pixels gives ``(b, prefix + h*w, c)``. ``size``: the input images'."""
    if _is_token_vit(model):
        return TimmVitTokens(model, layer, size, name=name)
    return StageMaps(
        _stage_map,
        model,
        layer,
        len(getattr(model, "feature_info", None) or []),
        size,
        drop_prefix_tokens=drop_prefix_tokens,
        name=name,
        model_name=model_name,
    )


class TimmVitTokens:
    """A timm ViT's block outputs: ``prefix + h*w`` tokens."""

    def __init__(
        self, model: torch.nn.Module, layer: int, size: tuple[int, int], *, name: str
    ) -> None:
        self.num_layers = len(model.blocks)
        if layer == 0 or layer == -(self.num_layers + 1):
            raise ValueError(
                f"encoder '{name}': layer {layer} (the embeddings) is not available from "
                f"timm; use a block output: 1..{self.num_layers} or -{self.num_layers}..-1"
            )
        self.block = layer - 1 if layer > 0 else self.num_layers + layer
        self.grid = tuple(model.patch_embed.dynamic_feat_size(size))
        self.hidden_size, self.num_prefix_tokens = model.embed_dim, model.num_prefix_tokens

    def __call__(self, model: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        out = model.forward_intermediates(
            pixel_values,
            indices=[self.block],
            norm=False,
            stop_early=True,
            output_fmt="NLC",
            intermediates_only=True,
            return_prefix_tokens=self.num_prefix_tokens > 0,
        )[0]
        if isinstance(out, tuple):  # (spatial, prefix)
            return torch.cat([out[1], out[0]], dim=1)
        return out


def _stage_map(model: torch.nn.Module, pixel_values: torch.Tensor, stage: int) -> torch.Tensor:
    return model.forward_intermediates(
        pixel_values,
        indices=[stage],
        norm=False,
        stop_early=True,
        output_fmt="NCHW",
        intermediates_only=True,
    )[0]


def _is_token_vit(model: torch.nn.Module) -> bool:
    """A ViT whose blocks carry ``prefix + patch`` tokens that ``forward_intermediates`` returns
    (timm's VisionTransformer, Eva, Beit, ...)."""
    patch_embed = getattr(model, "patch_embed", None)
    intermediates = inspect.signature(model.forward_intermediates).parameters
    return (
        "return_prefix_tokens" in intermediates
        and hasattr(model, "blocks")
        and hasattr(model, "num_prefix_tokens")
        and hasattr(model, "embed_dim")
        and hasattr(patch_embed, "img_size")
        and hasattr(patch_embed, "dynamic_feat_size")
    )


def _fetch_failed(model_name: str, error: OSError) -> str:
    import timm

    try:
        repo = timm.models.get_pretrained_cfg_value(model_name, "hf_hub_id")
    except RuntimeError:  # an unknown pretrained tag
        repo = None
    source = f" (its Hub repo '{repo}' holds model.safetensors)" if repo else ""
    return (
        f"encoder 'timm': cannot fetch '{model_name}' from the Hub or timm's URL "
        f"({type(error).__name__}: {error}); on a machine without network, copy the weights "
        f"as a .safetensors file{source} and pass pretrained='path/to/model.safetensors' "
        "with the same model_name, or put them in the Hub cache and set HF_HUB_OFFLINE=1"
    )
