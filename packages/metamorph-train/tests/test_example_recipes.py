"""examples/recipes: the paper's set-up (SigLIP so400m + Llama-3.1-8B-Instruct + SD 1.5) and
the Qwen variant parse as written, and build and train a step with tiny stand-ins saved where
the hub checkpoints would be (only the checkpoint paths and the data are overridden)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from metamorph_core.testing import build_tiny_tokenizer, save_tiny_backbone
from metamorph_train.recipe import load_recipe
from metamorph_train.runner import run_recipe

RECIPES = Path(__file__).parents[3] / "examples" / "recipes"


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    """Tiny SigLIP, Llama, Qwen2 and SD-1.5-layout checkpoints, and a little data."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    from metamorph_encoders.pretrain import build_siglip, save_siglip, small_siglip_config

    root = tmp_path_factory.mktemp("hub")
    tok = build_tiny_tokenizer()
    config = small_siglip_config(len(tok), image_size=16, patch_size=4, hidden_size=32)
    save_siglip(build_siglip(config), tok, root / "siglip")
    save_tiny_backbone(root / "llama", "llama")
    save_tiny_backbone(root / "qwen2", "qwen2")
    torch.manual_seed(0)
    sd = root / "sd15"
    UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(16, 32),
        cross_attention_dim=768,  # SD 1.5's text width, which the paper's adapter targets
        attention_head_dim=8,
        norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    ).save_pretrained(sd / "unet")
    AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=16,
    ).save_pretrained(sd / "vae")
    DDPMScheduler(num_train_timesteps=100).save_pretrained(sd / "scheduler")
    (root / "images").mkdir()
    Image.fromarray(np.full((16, 16, 3), (200, 30, 30), np.uint8)).save(root / "images/red.png")
    records = [
        {
            "id": "u",
            "image": "red.png",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat colour is it?"},
                {"from": "gpt", "value": "red"},
            ],
        },
        {
            "id": "g",
            "image": "red.png",
            "conversations": [
                {"from": "human", "value": "Generate an image of red."},
                {"from": "gpt", "value": "Here is an image based on your request: <image>"},
            ],
        },
    ]
    (root / "data.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return root


def _overrides(root: Path, out: Path, extra: list[str]) -> list[str]:
    source = {"path": str(root / "data.jsonl"), "image_root": str(root / "images")}
    return [
        f"data.sources={json.dumps([source])}",
        "data.feature_cache=null",
        f"train.output_dir={out}",
        "train.steps=1",
        "train.batch_size=2",
        "train.grad_accum=1",
        "train.bf16=false",  # bf16 autocast on a 2-core CPU is slow, and tested elsewhere
        *extra,
    ]


def test_the_files_parse_as_written():
    names = sorted(p.name for p in RECIPES.glob("*.yaml"))
    assert names == [
        "paper-decoder-sd15.yaml",
        "paper-stage1-projector.yaml",
        "paper-stage2-full.yaml",
        "qwen-lora.yaml",
        "stage2-with-guidance.yaml",
    ]
    stage1 = load_recipe(RECIPES / "paper-stage1-projector.yaml")
    assert stage1.model["backbone"]["kwargs"]["pretrained"] == "meta-llama/Llama-3.1-8B-Instruct"
    assert stage1.model["encoder"]["kwargs"]["pretrained"] == "google/siglip-so400m-patch14-384"
    assert load_recipe(RECIPES / "paper-stage2-full.yaml").train.strategy == "fsdp"
    decoder = load_recipe(RECIPES / "paper-decoder-sd15.yaml")
    assert decoder.model.decoder["kwargs"]["context_length"] == 77
    assert load_recipe(RECIPES / "qwen-lora.yaml").options.lora["r"] == 64
    for path in RECIPES.glob("*.yaml"):  # comments aside, nothing the loader ignores
        assert set(yaml.safe_load(path.read_text())) <= {"objective", "model", "data", "train"}


def test_paper_stages_build_and_train_with_stand_ins(stand_ins, tmp_path):
    encoder = f"model.encoder.kwargs.pretrained={stand_ins / 'siglip'}"
    stage1 = load_recipe(
        RECIPES / "paper-stage1-projector.yaml",
        _overrides(
            stand_ins,
            tmp_path / "stage1",
            [encoder, f"model.backbone.kwargs.pretrained={stand_ins / 'llama'}"],
        ),
    )
    first = run_recipe(stage1, log=None)
    stage2 = load_recipe(
        RECIPES / "paper-stage2-full.yaml",
        _overrides(stand_ins, tmp_path / "stage2", [f"objective.init_from={first['saved']}"]),
    )
    second = run_recipe(stage2, log=None)
    assert second["step"] == 1 and Path(second["saved"]).is_dir()
    decoder = load_recipe(
        RECIPES / "paper-decoder-sd15.yaml",
        _overrides(
            stand_ins,
            tmp_path / "decoder",
            [encoder, f"model.decoder.kwargs.pretrained={stand_ins / 'sd15'}"],
        ),
    )
    done = run_recipe(decoder, log=None)
    assert json.loads((Path(done["saved"]) / "config.json").read_text())["context_length"] == 77


def test_qwen_lora_builds_and_trains_with_stand_ins(stand_ins, tmp_path):
    recipe = load_recipe(
        RECIPES / "qwen-lora.yaml",
        _overrides(
            stand_ins,
            tmp_path / "qwen",
            [
                f"model.encoder.kwargs.pretrained={stand_ins / 'siglip'}",
                f"model.backbone.kwargs.pretrained={stand_ins / 'qwen2'}",
                "objective.lora.r=4",
            ],
        ),
    )
    done = run_recipe(recipe, log=None)
    assert (Path(done["saved"]) / "backbone" / "adapter_model.safetensors").is_file()
