"""What a research checkpoint's ``config.json`` says, as MetaMorph components.

The research code (facebookresearch/metamorph) stores a Llama config plus its multimodal
fields. :func:`read_spec` checks each field this library can reproduce exactly and refuses the
rest, naming the field, its value and what is supported; :func:`llama_config` is the plain
Llama config left once the multimodal fields are removed; :func:`map_weights` moves a
research ``nn.Sequential`` (or ``nn.Linear``) onto one of our projectors or heads.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from metamorph_core.errors import CheckpointError

RESEARCH_MODEL_TYPE = "metamorph_llama"
DEFAULT_TOWER = "google/siglip-so400m-patch14-384"  # what the research code always loads

# config fields written or read by the research code that a plain Llama does not have
RESEARCH_FIELDS = frozenset(
    {
        "mm_vision_tower", "use_mm_proj", "mm_projector_type", "mm_hidden_size",
        "mm_vision_select_layer", "mm_vision_select_feature", "mm_patch_merge_type",
        "image_aspect_ratio", "tokenizer_padding_side", "tokenizer_model_max_length",
        "tune_mm_mlp_adapter", "freeze_mm_mlp_adapter", "mm_use_im_start_end",
        "mm_projector_lr", "vision_lr", "vision_head_type", "image_token_reduction",
        "num_image_tokens", "freeze_vision", "normalize_vision", "apply_softmax", "vision_coef",
        "use_vision_ar", "mm_use_im_patch_token", "max_sequence_length", "vision_tower",
        "mm_vision_tower_lr", "unfreeze_mm_vision_tower", "auto_map", "architectures",
        "model_type", "_name_or_path",
    }
)  # fmt: skip
PROJECTOR_PREFIX = "model.mm_projector"
HEAD_PREFIX = "vision_head"
TOWER_PREFIX = "model.vision_tower.vision_tower."
IGNORED_PREFIXES = ("model.vision_proj.",)  # created by the research code, never used
_MLP = re.compile(r"^mlp(\d+)x_gelu$")


@dataclass(frozen=True)
class ResearchSpec:
    """Our registry names and options for a research checkpoint.

    ``projector`` / ``head``: our registry names; ``*_sequential``: whether the research module
    is an ``nn.Sequential`` (keys ``PREFIX.{i}.*``) or a bare ``nn.Linear`` (``PREFIX.*``).
    ``encoder_options``: our ``siglip`` encoder's ``layer``, ``num_tokens``, ``reduction``,
    ``normalize``. ``token_dim``: the research ``mm_hidden_size``."""

    projector: str
    projector_sequential: bool
    head: str
    head_sequential: bool
    encoder_options: dict[str, Any]
    token_dim: int
    tower: str | None

    @property
    def num_tokens(self) -> int:
        return int(self.encoder_options["num_tokens"])


def _refuse(field: str, value: Any, supported: str) -> CheckpointError:
    return CheckpointError(
        f"research config.json: {field}={value!r} cannot be converted exactly; supported: "
        f"{supported}. Convert a checkpoint trained with the paper's settings"
    )


def read_spec(config: dict[str, Any]) -> ResearchSpec:
    """The components of the research ``config`` (its ``config.json``); a setting with no
    exact MetaMorph equivalent is a ``CheckpointError`` naming it."""
    projector_type = config.get("mm_projector_type", "linear")
    if projector_type == "linear":
        projector, projector_seq = "linear", False
    elif _MLP.match(projector_type):
        projector, projector_seq = projector_type, True
    else:
        raise _refuse("mm_projector_type", projector_type, "'linear', 'mlp{N}x_gelu'")
    head_type = config.get("vision_head_type")
    if head_type in ("mlp", "mlp2x_gelu"):
        head, head_seq = head_type, True
    elif head_type in (None, "None"):  # the research constructor's default: Linear(d, 1152)
        head, head_seq = "linear", False
    elif head_type == "linear":
        raise CheckpointError(
            "research config.json: vision_head_type='linear' builds Linear(d, d) in the research "
            "code, whose output is the LLM width, not the encoder's tokens; no MetaMorph head "
            "predicts that. Supported: 'mlp' (the paper's), 'mlp2x_gelu', or none"
        )
    else:
        raise _refuse("vision_head_type", head_type, "'mlp' (the paper's), 'mlp2x_gelu'")
    checks = [  # field, value (research default when missing), accepted values
        ("mm_use_im_start_end", config.get("mm_use_im_start_end", False), (True,)),
        # written False by every research script; only an explicit True is refused
        ("mm_use_im_patch_token", config.get("mm_use_im_patch_token", False), (False,)),
        ("normalize_vision", config.get("normalize_vision", False), (True,)),
        ("apply_softmax", config.get("apply_softmax", False), (False,)),
        ("image_token_reduction", config.get("image_token_reduction", "none"), ("interpolation",)),
        ("mm_vision_select_feature", config.get("mm_vision_select_feature", "patch"), ("patch",)),
        ("mm_patch_merge_type", config.get("mm_patch_merge_type", "flat"), ("flat",)),
        ("image_aspect_ratio", config.get("image_aspect_ratio", "square"), ("square",)),
    ]
    for field, value, accepted in checks:
        if value not in accepted:
            raise _refuse(field, value, " or ".join(repr(a) for a in accepted))
    num_tokens = int(config.get("num_image_tokens", 256))
    if num_tokens < 1 or math.isqrt(num_tokens) ** 2 != num_tokens:
        raise _refuse("num_image_tokens", num_tokens, "a square number (64 = 8x8)")
    if "mm_hidden_size" not in config:
        raise CheckpointError("research config.json has no mm_hidden_size (the encoder width)")
    return ResearchSpec(
        projector=projector,
        projector_sequential=projector_seq,
        head=head,
        head_sequential=head_seq,
        encoder_options={
            "layer": int(config.get("mm_vision_select_layer", -2)),  # research default: -2
            "num_tokens": num_tokens,
            "reduction": "interpolate",
            "normalize": True,
        },
        token_dim=int(config["mm_hidden_size"]),
        tower=config.get("mm_vision_tower"),
    )


def llama_config(config: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The plain Llama ``config.json`` inside the research one (``model_type`` ``llama``,
    ``LlamaForCausalLM``), and the research-only fields dropped. Every other field, legacy
    ones such as ``rope_scaling`` included, is kept for transformers to read."""
    dropped = sorted(k for k in config if k in RESEARCH_FIELDS)
    out = {k: v for k, v in config.items() if k not in RESEARCH_FIELDS}
    out.update(model_type="llama", architectures=["LlamaForCausalLM"])
    return out, dropped


def research_key(ours: str, prefix: str, sequential: bool) -> str:
    """The research key of our projector/head key ``net.{i}.{param}``."""
    _, index, param = ours.split(".", 2)
    return f"{prefix}.{index}.{param}" if sequential else f"{prefix}.{param}"


def map_weights(
    module: nn.Module, found: dict[str, torch.Tensor], prefix: str, sequential: bool, what: str
) -> dict[str, torch.Tensor]:
    """``module``'s state dict filled from the research tensors ``found`` (full research keys
    under ``prefix``): every key present exactly once, every shape equal; otherwise a
    ``CheckpointError`` naming the keys and shapes."""
    want = {k: research_key(k, prefix, sequential) for k in module.state_dict()}
    missing = sorted(set(want.values()) - set(found))
    extra = sorted(set(found) - set(want.values()))
    if missing or extra:
        raise CheckpointError(
            f"the checkpoint's {what} does not have the layout its config.json names: missing "
            f"{missing[:8]}, unexpected {extra[:8]}"
        )
    out = {}
    for ours, theirs in want.items():
        shape, got = tuple(module.state_dict()[ours].shape), tuple(found[theirs].shape)
        if got != shape:
            raise CheckpointError(
                f"the checkpoint's {what} weight '{theirs}' has shape {got}, but it maps to "
                f"'{ours}' of shape {shape}; config.json (hidden_size, mm_hidden_size) and the "
                "weights disagree"
            )
        out[ours] = found[theirs]
    return out
