"""The research checkpoint's SigLIP tower as our ``siglip`` encoder.

The research code always loads ``google/siglip-so400m-patch14-384`` and reads
``hidden_states[mm_vision_select_layer]``; a full checkpoint also holds the tower under
``model.vision_tower.vision_tower.*``. With those weights the tower is written as a
``SiglipVisionModel`` directory (its config from ``encoder``'s local copy, else read off the
weight shapes; the unused pooling ``head.*`` dropped); without them the encoder is loaded from
``encoder``'s local copy. Nothing is downloaded.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from metamorph_core import create
from metamorph_core.dtypes import dtype_name
from metamorph_core.errors import CheckpointError
from metamorph_train.research.spec import DEFAULT_TOWER, TOWER_PREFIX, ResearchSpec

logger = logging.getLogger("metamorph")
# towers recognised by their weight shapes alone (attention heads and the image size cannot be
# read off the weights: so400m's 384-pixel images give a 27x27 grid of 14-pixel patches)
KNOWN_TOWERS = {
    "google/siglip-so400m-patch14-384": {
        "hidden_size": 1152,
        "patch_size": 14,
        "num_positions": 729,
        "intermediate_size": 4304,
        "num_hidden_layers": 27,
        "num_attention_heads": 16,
        "image_size": 384,
    }
}


def local_copy(source: str) -> Path | None:
    """``source`` as a local directory: itself, or its snapshot in the local Hugging Face
    cache (never downloaded); ``None`` when neither exists."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source, local_files_only=True))
    except (ImportError, OSError, ValueError):
        return None


def build_encoder(
    aux: dict[str, torch.Tensor],
    spec: ResearchSpec,
    source: str | None,
    torch_dtype: torch.dtype,
    stage: Path,
) -> tuple[Any, dict[str, Any]]:
    """Our ``siglip`` encoder with the research options, from the checkpoint's tower
    (``aux``'s ``model.vision_tower.vision_tower.*`` tensors, written under ``stage`` as a
    ``SiglipVisionModel`` directory) or, without one, from ``source``; and what to record."""
    source = source or DEFAULT_TOWER
    local = local_copy(source)
    options = {**spec.encoder_options, "dtype": dtype_name(torch_dtype)}
    n = len(TOWER_PREFIX)
    tower = {k[n:]: v for k, v in aux.items() if k.startswith(TOWER_PREFIX)}
    record = {"encoder_source": source, "research_vision_tower": spec.tower}
    if not tower:
        if local is None:
            raise CheckpointError(
                f"the checkpoint holds no vision tower ({TOWER_PREFIX}*) and '{source}' is "
                "neither a local directory nor in the local Hugging Face cache; nothing is "
                f"downloaded: pass --encoder DIR (a SigLIP checkpoint, e.g. {DEFAULT_TOWER} "
                "downloaded with `huggingface-cli download`)"
            )
        record["encoder_weights"] = str(local.resolve())
        return create("encoder", "siglip", pretrained=str(local), **options), record
    from transformers import SiglipVisionModel

    cfg = tower_config(tower, local, source)
    with torch.device("meta"):
        model = SiglipVisionModel._from_config(cfg, dtype=torch_dtype)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    prefix = "" if "embeddings.patch_embedding.weight" in expected else "vision_model."
    state = {prefix + k: v.to(torch_dtype) for k, v in tower.items() if not k.startswith("head.")}
    dropped = sorted(TOWER_PREFIX + k for k in tower if k.startswith("head."))
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = [k for k in set(state) & set(expected) if tuple(state[k].shape) != expected[k]]
    if missing or extra or wrong:
        raise CheckpointError(
            f"the checkpoint's vision tower does not fit the SigLIP config (from "
            f"{local or 'the weight shapes'}): missing {missing[:8]}, unexpected {extra[:8]}, "
            f"wrong shapes {sorted(wrong)[:8]}; pass --encoder DIR with the tower's config.json"
        )
    model.load_state_dict(state, strict=True, assign=True)
    target = stage / "encoder"
    model.save_pretrained(str(target))
    if local is not None and (local / "preprocessor_config.json").is_file():
        shutil.copyfile(local / "preprocessor_config.json", target / "preprocessor_config.json")
    if dropped:
        logger.info(
            "dropping the SigLIP pooling head (%d weights), which MetaMorph never reads",
            len(dropped),
        )
    record.update(encoder_weights="the checkpoint's vision tower", dropped_weights=dropped)
    return create("encoder", "siglip", pretrained=str(target), **options), record


def tower_config(tower: dict[str, torch.Tensor], local: Path | None, source: str) -> Any:
    """The SigLIP vision config of ``tower``: ``local``'s, else that of the
    :data:`KNOWN_TOWERS` entry whose shapes ``tower`` has; neither is a ``CheckpointError``."""
    from transformers import SiglipVisionConfig

    if local is not None and (local / "config.json").is_file():
        cfg = SiglipVisionConfig.from_pretrained(str(local), vision_use_head=False)
        if not str(cfg.model_type).startswith("siglip"):
            raise CheckpointError(f"'{local}' holds a '{cfg.model_type}' model, not SigLIP")
        return cfg
    try:
        patch = tuple(tower["embeddings.patch_embedding.weight"].shape)
        positions = int(tower["embeddings.position_embedding.weight"].shape[0])
        inter = int(tower["encoder.layers.0.mlp.fc1.weight"].shape[0])
    except KeyError as e:
        raise CheckpointError(f"the checkpoint's vision tower lacks {e}; it is not SigLIP") from e
    layers = {int(m.group(1)) for k in tower if (m := re.match(r"encoder\.layers\.(\d+)\.", k))}
    shapes = {
        "hidden_size": patch[0],
        "patch_size": patch[-1],
        "num_positions": positions,
        "intermediate_size": inter,
        "num_hidden_layers": len(layers),
    }
    for known in KNOWN_TOWERS.values():
        if all(known[k] == v for k, v in shapes.items()):
            fields = {k: v for k, v in known.items() if k != "num_positions"}
            return SiglipVisionConfig(**fields, vision_use_head=False)
    raise CheckpointError(
        f"the checkpoint's vision tower ({shapes}) is not {', '.join(KNOWN_TOWERS)}, and "
        f"'{source}' gives no config to read its attention heads and image size from; pass "
        "--encoder DIR holding the tower's config.json"
    )
