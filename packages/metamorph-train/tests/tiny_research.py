"""Tiny checkpoints written in the research code's layout (facebookresearch/metamorph), and
the research computation assembled by hand from plain torch / transformers modules, for the
tests of ``metamorph convert-research``. Key names and config fields follow the research
code; nothing here is its code."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from metamorph_core.testing import build_tiny_tokenizer

HIDDEN, TOKEN_DIM, NUM_TOKENS, IMAGE, PATCH = 32, 24, 64, 36, 4  # a 9x9 grid -> 8x8 tokens
# Llama 3.1's rope (scaled for the tiny context): wrong rope handling changes every logit
ROPE = {
    "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
    "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
}  # fmt: skip
RESEARCH_FIELDS = {
    "mm_vision_tower": "siglip/CLIP-ViT-SO400M-14-384",
    "use_mm_proj": True,
    "mm_projector_type": "mlp2x_gelu",
    "mm_hidden_size": TOKEN_DIM,
    "mm_vision_select_layer": -1,
    "mm_vision_select_feature": "patch",
    "mm_patch_merge_type": "flat",
    "image_aspect_ratio": "square",
    "tokenizer_padding_side": "right",
    "tokenizer_model_max_length": 4096,
    "tune_mm_mlp_adapter": False,
    "freeze_mm_mlp_adapter": False,
    "mm_use_im_start_end": True,
    "mm_projector_lr": None,
    "vision_lr": None,
    "vision_head_type": "mlp",
    "image_token_reduction": "interpolation",
    "num_image_tokens": NUM_TOKENS,
    "freeze_vision": True,
    "normalize_vision": True,
    "apply_softmax": False,
    "vision_coef": 1.0,
    "use_vision_ar": True,
    "mm_use_im_patch_token": False,
}


@dataclass
class ResearchParts:
    """The research model's modules: ``llama`` (``model.*``, ``lm_head``), ``projector``
    (``model.mm_projector``), ``vision_head``, ``vision_proj`` and the SigLIP ``tower``."""

    llama: Any
    projector: nn.Sequential
    vision_head: nn.Sequential
    vision_proj: nn.Linear
    tower: Any
    tokenizer: Any


def build_parts(seed: int = 0) -> ResearchParts:
    from transformers import (
        AddedToken,
        LlamaConfig,
        LlamaForCausalLM,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    tokenizer = build_tiny_tokenizer("llama")
    base = len(tokenizer)
    tokenizer.add_tokens(
        [AddedToken(t, special=True, normalized=False) for t in ("<image_start>", "<image_end>")],
        special_tokens=True,
    )
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=base + 2,
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        rope_parameters=ROPE,
    )
    llama = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # as the research code initialises the two new rows
        for w in (llama.get_input_embeddings().weight, llama.get_output_embeddings().weight):
            w[base:] = w[:base].mean(0, keepdim=True) + 0.01 * torch.randn(2, HIDDEN)
    tower_cfg = SiglipVisionConfig(
        hidden_size=TOKEN_DIM,
        intermediate_size=2 * TOKEN_DIM,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE,
        patch_size=PATCH,
    )
    return ResearchParts(
        llama=llama,
        projector=nn.Sequential(nn.Linear(TOKEN_DIM, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, HIDDEN)),
        vision_head=nn.Sequential(
            nn.Linear(HIDDEN, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, TOKEN_DIM)
        ),
        vision_proj=nn.Linear(HIDDEN, HIDDEN),
        tower=SiglipVisionModel(tower_cfg).eval(),
        tokenizer=tokenizer,
    )


def research_state(parts: ResearchParts, tower: bool = True) -> dict[str, torch.Tensor]:
    """The state dict of the research ``MetaMorphLlamaForCausalLM`` (its key names)."""
    state = dict(parts.llama.state_dict())
    for prefix, module in (
        ("model.mm_projector.", parts.projector),
        ("vision_head.", parts.vision_head),
        ("model.vision_proj.", parts.vision_proj),
    ):
        state.update({prefix + k: v for k, v in module.state_dict().items()})
    if tower:
        for k, v in parts.tower.state_dict().items():
            k = k.removeprefix("vision_model.")  # the research tower is the inner transformer
            state[f"model.vision_tower.vision_tower.{k}"] = v
    return {k: v.detach().clone().contiguous() for k, v in state.items()}


def write_checkpoint(
    parts: ResearchParts,
    path: Path,
    layout: str = "safetensors",
    tower: bool = True,
    **config_overrides: Any,
) -> Path:
    """A research checkpoint directory: ``config.json`` (Llama fields as transformers 4.45
    writes them, ``rope_theta`` + ``rope_scaling``, plus the research fields), the weights in
    ``layout`` (``safetensors``, ``sharded``, ``bin``, ``bin-sharded``) and the tokenizer."""
    path.mkdir(parents=True)
    llama = parts.llama.config.to_dict()
    rope = dict(llama.pop("rope_parameters"))
    llama.update(
        rope_theta=rope.pop("rope_theta"),
        rope_scaling=rope,
        torch_dtype=llama.pop("dtype"),
        transformers_version="4.45.0",
    )
    config = {**llama, **RESEARCH_FIELDS, **config_overrides}
    config.update(model_type="metamorph_llama", architectures=["MetaMorphLlamaForCausalLM"])
    (path / "config.json").write_text(json.dumps(config, indent=2))
    parts.tokenizer.save_pretrained(str(path))
    state = research_state(parts, tower)
    if layout == "safetensors":
        save_file(state, str(path / "model.safetensors"), {"format": "pt"})
    elif layout == "bin":
        torch.save(state, path / "pytorch_model.bin")
    else:
        keys = sorted(state)
        shards = [keys[: len(keys) // 2], keys[len(keys) // 2 :]]
        ext, stem = (
            ("bin", "pytorch_model") if layout == "bin-sharded" else ("safetensors", "model")
        )
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"{stem}-{i:05d}-of-{len(shards):05d}.{ext}"
            part = {k: state[k] for k in shard}
            if ext == "bin":
                torch.save(part, path / name)
            else:
                save_file(part, str(path / name), {"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
        index = {"metadata": {}, "weight_map": weight_map}
        (path / f"{stem}.{ext}.index.json").write_text(json.dumps(index))
    return path


@torch.no_grad()
def research_features(parts: ResearchParts, pixel_values: torch.Tensor) -> torch.Tensor:
    """The research encoder path: ``hidden_states[-1]``, the patch grid interpolated to
    ``sqrt(num_image_tokens)`` squared (fp32, bilinear, ``align_corners=False``), L2-normalised."""
    x = parts.tower(pixel_values=pixel_values, output_hidden_states=True).hidden_states[-1]
    b, n, c = x.shape
    side, target = int(n**0.5), int(NUM_TOKENS**0.5)
    x = x.view(b, side, side, c).permute(0, 3, 1, 2)
    x = F.interpolate(x.float(), size=(target, target), mode="bilinear", align_corners=False)
    x = x.permute(0, 2, 3, 1).contiguous().flatten(1, 2)
    return F.normalize(x, p=2, dim=-1)


@torch.no_grad()
def research_forward(
    parts: ResearchParts, input_ids: torch.Tensor, slots: torch.Tensor, pixel_values: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and L2-normalised vision-head outputs at every position: the image features
    through the projector written into the ``slots`` positions, then Llama, then both heads."""
    feats = parts.projector(research_features(parts, pixel_values))
    embeds = parts.llama.model.embed_tokens(input_ids).clone()
    embeds[slots] = feats.reshape(-1, feats.shape[-1])
    hidden = parts.llama.model(inputs_embeds=embeds).last_hidden_state
    logits = parts.llama.lm_head(hidden)
    return logits, F.normalize(parts.vision_head(hidden), p=2, dim=-1)


class ResearchAdapter(nn.Module):
    """The research visualizer's ``mlp`` adapter layout: ``layers``/``norms`` lists;
    Linear-LayerNorm-ReLU blocks, the last Linear-LayerNorm."""

    def __init__(self, dims: list[int]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True)
        )
        self.norms = nn.ModuleList(nn.LayerNorm(b) for b in dims[1:])
        with torch.no_grad():
            for norm in self.norms:
                norm.weight.normal_(1.0, 0.1)
                norm.bias.normal_(0.0, 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer, norm in zip(self.layers[:-1], self.norms[:-1], strict=True):
            x = F.relu(norm(layer(x)))
        return self.norms[-1](self.layers[-1](x))


def write_visualizer(root: Path, seed: int = 1) -> tuple[Path, Path, ResearchAdapter, Any]:
    """A tiny SD 1.5 directory (``root/sd15``: unet/ vae/ scheduler/) and a research
    visualizer (``root/visualizer``) fine-tuned from it; returns both directories, the
    research adapter and the fine-tuned UNet."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel

    from metamorph_decoders.testing import tiny_unet_config, tiny_vae_config

    unet_cfg = tiny_unet_config(in_channels=4, out_channels=4, sample_size=8)
    sd15, vis = root / "sd15", root / "visualizer"
    torch.manual_seed(seed)
    UNet2DConditionModel(**unet_cfg).save_pretrained(str(sd15 / "unet"))
    AutoencoderKL(**tiny_vae_config()).save_pretrained(str(sd15 / "vae"))
    PNDMScheduler(skip_prk_steps=True).save_pretrained(str(sd15 / "scheduler"))
    unet = UNet2DConditionModel(**unet_cfg).eval()  # the visualizer's fine-tuned weights
    adapter = ResearchAdapter([TOKEN_DIM, 40, unet_cfg["cross_attention_dim"]]).eval()
    vis.mkdir()
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=1e-5)
    adapter(torch.randn(1, 2, TOKEN_DIM)).sum().backward()
    optimizer.step()
    model_config = {
        "input_dim": TOKEN_DIM, "hidden_dim": 40, "output_dim": unet_cfg["cross_attention_dim"],
        "num_tokens": 77, "num_layers": 2, "num_heads": 8, "mode": "mlp",
    }  # fmt: skip
    torch.save(
        {
            "model_state_dict": adapter.state_dict(),
            "optimizer_state_dict": optimizer.state_dict(),
            "global_step": 10,
            "model_config": model_config,
        },
        vis / "adapter_checkpoint.pt",
    )
    torch.save(
        {"model_state_dict": unet.state_dict(), "global_step": 10}, vis / "unet_checkpoint.pt"
    )
    (vis / "model_config.json").write_text(json.dumps(model_config))
    return sd15, vis, adapter, unet
