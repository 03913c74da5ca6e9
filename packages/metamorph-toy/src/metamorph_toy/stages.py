"""The demo's stages as recipes: each builds the recipe tree of one stage (the ``siglip``
encoder, its centring mean and feature cache, the ``decoder``, the ``causal-lm``, ``vpit``, and
the optional decoder tuning on the LLM's predicted tokens) and trains it through the library's
recipe runner, writing the recipe to ``OUT/recipes/STAGE.yaml`` so that ``metamorph train``
reruns it by hand. :mod:`metamorph_toy.demo` orders them into a run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

from metamorph_toy import world as W
from metamorph_toy.evaluate import to_pixels
from metamorph_toy.presets import Preset

#: progress bars of this process's stages (off in a second lane: one lane owns the terminal)
_PROGRESS = {"show": True}

# the encoder and decoder stages draw the world's few thousand small renders for many epochs:
# each is read and decoded once and kept (``data.image_memory_mb``; the full preset's 8000
# renders take about 100 MiB), which gives the same batches as reading them every time
IMAGE_MEMORY_MB = 512


def hide_progress() -> None:
    """No progress bars from this process's stages (a second lane: the first owns the
    terminal)."""
    _PROGRESS["show"] = False


def _train(path: Path, tree: dict[str, Any]) -> None:
    """Train the recipe ``tree`` through the library's recipe runner; the recipe is also
    written to ``path`` (``metamorph train PATH`` reruns the stage by hand)."""
    from metamorph_train.recipe import parse_recipe
    from metamorph_train.runner import run_recipe

    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    if not _PROGRESS["show"]:
        tree = {**tree, "train": {**tree["train"], "progress": False}}
    run_recipe(parse_recipe(tree, where=str(path)))


def encoder_spec(out: Path, preset: Preset) -> dict[str, Any]:
    return {
        "name": "siglip",
        "kwargs": {
            "pretrained": str(out / "encoder" / "final"),
            "num_tokens": preset.num_tokens,
            "center": str(out / "encoder" / "token_mean.safetensors"),
        },
    }


def center_encoder(out: Path, preset: Preset, files: dict[str, Path]) -> None:
    """The small pretrained encoder's tokens share one dominant direction (measured: a mean
    cosine of 0.99 between different images), which drowns what tells images apart; its mean
    token over the training images is subtracted before normalisation (encoder option
    ``center``)."""
    from metamorph_core import create
    from metamorph_encoders.base import token_mean

    kwargs = dict(encoder_spec(out, preset)["kwargs"], center=None, normalize=False)
    encoder = create("encoder", "siglip", **kwargs)
    rows = [json.loads(x) for x in files["pairs"].read_text().splitlines()[:2048]]
    images = [np.asarray(Image.open(files["images"] / r["image"]).convert("RGB")) for r in rows]
    token_mean(
        encoder,
        to_pixels(images),
        out / "encoder" / "token_mean.safetensors",
        per_token=preset.encoder_center_per_token,
    )


def train_encoder(out: Path, preset: Preset, files: dict[str, Path], seed: int) -> None:
    _train(
        out / "recipes" / "encoder.yaml",
        {
            "objective": "siglip",
            "model": {
                "config": {
                    "image_size": preset.encoder_image,
                    "patch_size": preset.encoder_patch,
                    "hidden_size": preset.encoder_hidden,
                    "num_layers": 2,
                    "num_heads": 4,
                    "max_text_length": 16,
                    "pooling": preset.encoder_pooling,
                },
                "vocab_size": 400,
                "seed": seed,
            },
            "data": {
                "sources": [{"path": str(files["pairs"]), "image_root": str(files["images"])}],
                "image_memory_mb": IMAGE_MEMORY_MB,
            },
            "train": _train_section(
                out / "encoder",
                preset.encoder_steps,
                preset.encoder_batch,
                preset.encoder_lr,
                seed,
            ),
        },
    )


def _train_section(output: Path, steps: int, batch: int, lr: float, seed: int, **kw: Any) -> dict:
    return {
        "output_dir": str(output),
        "steps": steps,
        "batch_size": batch,
        "lr": lr,
        "seed": seed,
        "warmup_ratio": 0.05,
        "log_every": max(steps // 5, 1),
        "save_every": 0,
        "keep_last": 1,
        **kw,
    }


def cache_features(out: Path, preset: Preset, files: dict[str, Path]) -> None:
    """Every image of the run encoded once (``metamorph cache-features``'s builder)."""
    from metamorph_core import create
    from metamorph_train.cache import build_cache, image_paths
    from metamorph_train.data.records import check_image_record, read_records

    spec = encoder_spec(out, preset)
    encoder = create("encoder", spec["name"], **spec["kwargs"])
    paths = image_paths(read_records(files["all_images"], "raise", {}, check_image_record))
    build_cache(
        encoder, paths, files["images"], out / "cache", batch_size=256, progress=_PROGRESS["show"]
    )


def train_decoder(out: Path, preset: Preset, files: dict[str, Path], seed: int) -> None:
    channels = list(preset.decoder_channels)
    depth = len(channels)
    patch = preset.decoder_patch  # the UNet denoises patch x patch blocks folded into channels
    _train(
        out / "recipes" / "decoder.yaml",
        {
            "objective": "decoder",
            "model": {
                "encoder": encoder_spec(out, preset),
                "decoder": {
                    "name": "sd-unet",
                    "kwargs": {
                        "unet_config": {
                            "sample_size": W.IMAGE_SIZE // patch,
                            "in_channels": 3 * patch**2 + preset.decoder_spatial,
                            "out_channels": 3 * patch**2,
                            "layers_per_block": 1,
                            "block_out_channels": channels,
                            "cross_attention_dim": 64,
                            "attention_head_dim": 8,
                            "norm_num_groups": 8,
                            # cross-attention only at the lowest resolution (CPU cost)
                            "down_block_types": ["DownBlock2D"] * (depth - 1)
                            + ["CrossAttnDownBlock2D"],
                            "up_block_types": ["CrossAttnUpBlock2D"] + ["UpBlock2D"] * (depth - 1),
                        },
                        "adapter": {"name": "mlp", "kwargs": {"hidden_dims": [128]}},
                        "context_length": preset.num_tokens,
                        "spatial_channels": preset.decoder_spatial,
                        "spatial_detail": preset.decoder_spatial_detail,
                        "patch_size": patch,
                        "prediction_type": "sample",
                        "cond_dropout": preset.decoder_cond_dropout,
                        "token_noise": preset.decoder_token_noise,
                        "seed": seed,
                    },
                },
            },
            "data": {
                "sources": [{"path": str(files["decoder"]), "image_root": str(files["images"])}],
                "feature_cache": str(out / "cache"),
                "image_memory_mb": IMAGE_MEMORY_MB,
            },
            "train": _train_section(
                out / "decoder",
                preset.decoder_steps,
                preset.batch_size,
                preset.decoder_lr,
                seed,
                bf16=preset.decoder_bf16,
                schedule=preset.decoder_schedule,
                ema_decay=preset.decoder_ema,
            ),
        },
    )


def train_lm(out: Path, preset: Preset, files: dict[str, Path], seed: int) -> None:
    h = preset.lm_hidden
    _train(
        out / "recipes" / "lm.yaml",
        {
            "objective": "causal-lm",
            "model": {
                "architecture": "llama",
                "config": {
                    "hidden_size": h,
                    "intermediate_size": 4 * h,
                    "num_hidden_layers": preset.lm_layers,
                    "num_attention_heads": 4,
                    "num_key_value_heads": 4,
                    "tie_word_embeddings": False,
                },
                "vocab_size": 600,
                "max_length": 192,
                "seed": seed,
            },
            "data": {"sources": [{"path": str(files["lm_text"])}]},
            "train": _train_section(out / "lm", preset.lm_steps, 32, 3e-3, seed),
        },
    )


# VPiT's data mixture: each source is drawn with probability proportional to its weight
VPIT_WEIGHTS = {"understanding": 2.0, "generation": 2.0, "text": 1.0}


def train_vpit(out: Path, preset: Preset, files: dict[str, Path], seed: int, steps: int) -> None:
    sources = []
    for name, weight in VPIT_WEIGHTS.items():
        if files[name].stat().st_size:
            sources.append(
                {
                    "path": str(files[name]),
                    "image_root": str(files["images"]),
                    "weight": weight,
                    "name": name,
                }
            )
    _train(
        out / "recipes" / "vpit.yaml",
        {
            "objective": {"name": "vpit", "policy": "full", "prompt_dropout": 0.1},
            "model": {
                "encoder": encoder_spec(out, preset),
                "backbone": {
                    "name": "llama",
                    "kwargs": {"pretrained": str(out / "lm" / "final")},
                },
                "projector": "mlp2x_gelu",
                "head": "mlp2x_gelu",
                "template": "chatml"
                if preset.system_prompt
                else {"name": "chatml", "kwargs": {"default_system": None}},
            },
            "data": {"sources": sources, "feature_cache": str(out / "cache")},
            "train": _train_section(
                out / "vpit",
                steps,
                preset.batch_size,
                2e-3,
                seed,
            ),
        },
    )


def predict_tokens(out: Path, files: dict[str, Path]) -> None:
    """The tokens the trained LLM generates for every generation prompt it was trained on
    (``metamorph cache-features --predicted-by``), keyed by the prompt's image."""
    from metamorph_core import MetaMorphModel
    from metamorph_train.cache import build_predicted_cache
    from metamorph_train.data.records import check_image_record, read_records

    model_dir = out / "vpit" / "final"
    model = MetaMorphModel.from_pretrained(model_dir).eval()
    records = read_records(files["generation"], "raise", {}, check_image_record)
    build_predicted_cache(
        model, records, out / "cache-predicted", predicted_by=str(model_dir), batch_size=64
    )


def tune_decoder(out: Path, preset: Preset, files: dict[str, Path], seed: int) -> None:
    """Recipe ``decoder`` again, from the trained decoder, on the LLM's own predictions: each
    training image drawn from the tokens generated for its prompt. Tokens the LLM predicts
    are not the encoder's (they average over what a prompt leaves open), and a decoder that
    only saw exact tokens misplaces objects from them (measured above)."""
    _train(
        out / "recipes" / "decoder-tune.yaml",
        {
            "objective": "decoder",
            "model": {
                "encoder": encoder_spec(out, preset),
                "decoder": {
                    "name": "sd-unet",
                    "kwargs": {"pretrained": str(out / "decoder" / "final")},
                },
            },
            "data": {
                "sources": [{"path": str(files["generation"]), "image_root": str(files["images"])}],
                "feature_cache": str(out / "cache-predicted"),
            },
            "train": _train_section(
                out / "decoder-tuned",
                preset.decoder_tune_steps,
                preset.batch_size,
                5e-4,
                seed,
            ),
        },
    )
