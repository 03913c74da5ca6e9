"""The research visualizer (``visualization/train.py``) as our ``sd-unet`` decoder.

A visualizer directory holds ``adapter_checkpoint.pt`` and ``unet_checkpoint.pt`` (torch
pickles whose ``model_state_dict`` entry is the weights; loaded with ``weights_only=True``
only; a ``.safetensors`` file of the same stem holding the bare state dict is preferred when
present) and ``model_config.json`` (``input_dim``, ``hidden_dim``, ``output_dim``,
``num_layers``, ``mode``...). Stable Diffusion 1.5 (``--sd15``) gives the UNet's config, the
VAE and the noise schedule; the UNet's weights are the visualizer's.

Adapter keys (``mode`` ``mlp``, ``num_layers`` L): ``layers.{i}.*`` -> ``net.{3i}.*`` and
``norms.{i}.*`` -> ``net.{3i+1}.*`` of our ``mlp`` adapter with ``hidden_dims`` ``[hidden_dim]
* (L - 1)`` (Linear-LayerNorm-ReLU blocks, the last without ReLU). Settings as the research
code trains and samples: context 77 (zero-padded), null context zeros, epsilon prediction,
conditioning dropout 0.8.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from metamorph_core import create
from metamorph_core.errors import CheckpointError
from metamorph_train.research.weights import safe_torch_load, state_dict_of

ADAPTER, UNET, CONFIG = "adapter_checkpoint", "unet_checkpoint", "model_config.json"
SETTINGS = {
    "context_length": 77,
    "null_conditioning": "zeros",
    "prediction_type": "epsilon",
    "cond_dropout": 0.8,
}
_ADAPTER_KEY = re.compile(r"^(layers|norms)\.(\d+)\.(weight|bias)$")


def read_state(directory: Path, stem: str) -> tuple[dict[str, torch.Tensor], Path]:
    """``directory/stem.safetensors`` (a bare state dict), else ``directory/stem.pt``'s
    ``model_state_dict`` (``weights_only=True``)."""
    safe, pickled = directory / f"{stem}.safetensors", directory / f"{stem}.pt"
    if safe.is_file():
        return load_file(str(safe)), safe
    if not pickled.is_file():
        raise CheckpointError(
            f"visualizer directory '{directory}' has no {pickled.name} (or {safe.name}); the "
            f"research code's inference loader expects {ADAPTER}.pt, {UNET}.pt and {CONFIG}"
        )
    obj = safe_torch_load(pickled, "the visualizer checkpoint")
    return state_dict_of(obj, pickled, "model_state_dict"), pickled


def adapter_weights(state: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """The research adapter's ``layers.*``/``norms.*`` as our ``mlp`` adapter's ``net.*``."""
    out = {}
    for key, value in state.items():
        m = _ADAPTER_KEY.match(key)
        if m is None or int(m.group(2)) >= num_layers:
            raise CheckpointError(
                f"visualizer adapter weight '{key}' is not part of an 'mlp' adapter of "
                f"{num_layers} layers (layers.{{i}}.*, norms.{{i}}.*); {CONFIG} and the "
                "weights disagree"
            )
        index = 3 * int(m.group(2)) + (0 if m.group(1) == "layers" else 1)
        out[f"net.{index}.{m.group(3)}"] = value
    return out


def _model_config(directory: Path, token_dim: int) -> dict[str, Any]:
    path = directory / CONFIG
    if not path.is_file():
        raise CheckpointError(f"visualizer directory '{directory}' has no {CONFIG}")
    cfg = json.loads(path.read_text())
    if cfg.get("mode", "mlp") != "mlp":
        raise CheckpointError(
            f"{path}: mode={cfg['mode']!r}; only the paper's 'mlp' adapter converts (the "
            "research 'xattn' and 'transformer' adapters have no MetaMorph equivalent)"
        )
    missing = [k for k in ("input_dim", "hidden_dim", "output_dim", "num_layers") if k not in cfg]
    if missing:
        raise CheckpointError(f"{path} lacks {missing}")
    if int(cfg["input_dim"]) != token_dim:
        raise CheckpointError(
            f"{path}: the adapter reads {cfg['input_dim']}-d tokens but the converted encoder "
            f"gives {token_dim}-d ones; the visualizer was trained for another encoder"
        )
    if int(cfg["num_layers"]) < 1:
        raise CheckpointError(f"{path}: num_layers must be >= 1, got {cfg['num_layers']}")
    return cfg


def _check_unet(state: dict[str, torch.Tensor], unet_config: dict[str, Any], where: Path) -> None:
    """The visualizer's UNet weights must be exactly those of SD 1.5's UNet config."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config)
    expected = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(state) & set(expected) if tuple(state[k].shape) != expected[k])
    if missing or extra or wrong:
        raise CheckpointError(
            f"{where}: the UNet weights do not fit the --sd15 UNet config: missing "
            f"{missing[:8]}, unexpected {extra[:8]}, wrong shapes {wrong[:8]}; pass the Stable "
            "Diffusion 1.5 directory the visualizer was fine-tuned from"
        )


def convert_visualizer(
    directory: Path, sd15: Path, stage: Path, token_dim: int, num_tokens: int, dtype: str
) -> tuple[Any, dict[str, Any]]:
    """The ``sd-unet`` decoder of the research visualizer in ``directory`` on the SD 1.5
    directory ``sd15`` (built in ``stage/decoder``), and what to record about it."""
    from diffusers import UNet2DConditionModel

    cfg = _model_config(directory, token_dim)
    for sub in ("unet", "vae", "scheduler"):
        if not (sd15 / sub).is_dir():
            raise CheckpointError(
                f"--sd15 '{sd15}' has no {sub}/; pass a Stable Diffusion 1.5 directory "
                "(stable-diffusion-v1-5/stable-diffusion-v1-5) with unet/, vae/ and scheduler/"
            )
    unet_config = dict(UNet2DConditionModel.load_config(str(sd15 / "unet")))
    if int(cfg["output_dim"]) != int(unet_config["cross_attention_dim"]):
        raise CheckpointError(
            f"{directory / CONFIG}: the adapter outputs {cfg['output_dim']}-d context but the "
            f"--sd15 UNet cross-attends to {unet_config['cross_attention_dim']}-d; pass the SD "
            "directory the visualizer was trained on"
        )
    adapter_state, adapter_file = read_state(directory, ADAPTER)
    unet_state, unet_file = read_state(directory, UNET)
    _check_unet(unet_state, unet_config, unet_file)
    num_layers = int(cfg["num_layers"])
    root = stage / "decoder"
    (root / "unet").mkdir(parents=True)
    shutil.copyfile(sd15 / "unet" / "config.json", root / "unet" / "config.json")
    contiguous = {k: v.contiguous() for k, v in unet_state.items()}
    save_file(contiguous, str(root / "unet" / "diffusion_pytorch_model.safetensors"))
    del contiguous, unet_state
    for sub in ("vae", "scheduler"):  # read from SD 1.5 in place
        (root / sub).symlink_to((sd15 / sub).resolve(), target_is_directory=True)
    mapped = adapter_weights(adapter_state, num_layers)
    save_file({k: v.contiguous() for k, v in mapped.items()}, str(root / "adapter.safetensors"))
    adapter = {
        "name": "mlp",
        "kwargs": {"hidden_dims": [int(cfg["hidden_dim"])] * (num_layers - 1)},
    }
    decoder = create(
        "decoder",
        "sd-unet",
        token_dim=token_dim,
        num_tokens=num_tokens,
        pretrained=str(root),
        adapter=adapter,
        dtype=dtype,
        **SETTINGS,
    )
    record = {
        "directory": str(directory.resolve()),
        "adapter_weights": adapter_file.name,
        "unet_weights": unet_file.name,
        "sd15": str(sd15.resolve()),
        "model_config": cfg,
    }
    return decoder, record
