"""The feature cache: encode once, train from the tokens, same loss; stale caches refused."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from metamorph_core import MetaMorphModel, create
from metamorph_core.testing import save_tiny_backbone, tiny_model_config
from metamorph_train.cache import FeatureCache, build_cache, image_paths
from metamorph_train.data import ConversationDataset, read_records

transformers.utils.logging.disable_progress_bar()
ENC = {"image_size": 16, "patch_size": 4, "hidden_size": 24, "num_tokens": 4}


@pytest.fixture
def dataset(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    records = []
    for i in range(5):
        Image.fromarray((rng.random((20, 20, 3)) * 255).astype(np.uint8)).save(
            tmp_path / "img" / f"{i}.png"
        )
        records.append(
            {
                "id": f"u{i}",
                "image": f"{i}.png",
                "conversations": [
                    {"from": "human", "value": "<image>\\nwhat colour?"},
                    {"from": "gpt", "value": "red"},
                ],
            }
        )
    records.append(
        {
            "id": "g",
            "image": "3.png",
            "conversations": [
                {"from": "human", "value": "draw a red square"},
                {"from": "gpt", "value": "here: <image>"},
            ],
        }
    )
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    return tmp_path


def test_cached_features_give_the_live_loss(dataset, tmp_path):
    model = MetaMorphModel.from_config(
        tiny_model_config(save_tiny_backbone(tmp_path / "bb"))
    ).eval()
    paths = image_paths(read_records(dataset / "data.jsonl"))
    assert paths == [f"{i}.png" for i in range(5)]
    for rank in (1, 0):  # two ranks, each its share; the last one merges the index
        build_cache(
            model.encoder,
            paths,
            dataset / "img",
            tmp_path / "cache",
            batch_size=2,
            shard_size=2,
            rank=rank,
            world_size=2,
        )
    cache = FeatureCache(tmp_path / "cache", model.encoder)
    assert len(cache) == 5 and len(list((tmp_path / "cache").glob("shard-*.safetensors"))) == 3
    live = ConversationDataset(dataset / "data.jsonl", dataset / "img")
    cached = ConversationDataset(dataset / "data.jsonl", dataset / "img", feature_cache=cache)
    with torch.no_grad():
        a = model(**model.prepare_batch([live[i] for i in range(len(live))]))
        batch = model.prepare_batch([cached[i] for i in range(len(cached))])
        assert "pixel_values" not in batch and batch["image_features"].shape == (6, 4, 24)
        b = model(**batch)
    assert torch.allclose(a.loss, b.loss, atol=1e-6) and a.visual_tokens == b.visual_tokens == 4


def test_a_cache_from_another_encoder_is_refused(dataset, tmp_path):
    enc = create("encoder", "tiny-patch", **ENC)
    build_cache(enc, ["0.png"], dataset / "img", tmp_path / "cache")
    other = create("encoder", "tiny-patch", **{**ENC, "seed": 1})
    with pytest.raises(ValueError, match="made by another encoder configuration.*seed"):
        FeatureCache(tmp_path / "cache", other)
    with pytest.raises(ValueError, match="another encoder configuration"):
        build_cache(other, ["1.png"], dataset / "img", tmp_path / "cache")
    with pytest.raises(FileNotFoundError, match="not a complete feature cache"):
        FeatureCache(tmp_path / "nothing", enc)


def test_cli_builds_a_cache(dataset, tmp_path):
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "metamorph_core.cli",
            "cache-features",
            "--data",
            str(dataset / "data.jsonl"),
            "--image-root",
            str(dataset / "img"),
            "--out",
            str(tmp_path / "cache"),
            "--encoder",
            "tiny-patch",
            "--encoder-kwargs",
            json.dumps(ENC),
        ],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    assert "cached 5 images" in res.stdout
    assert len(FeatureCache(tmp_path / "cache", create("encoder", "tiny-patch", **ENC))) == 5
