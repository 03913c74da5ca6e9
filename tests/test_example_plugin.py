"""The example third-party package (examples/metamorph-dinov2), installed by `make test` like a
user would install it, works end to end with no edit to our packages."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import transformers

from metamorph_core import MetaMorphModel, create
from metamorph_core.testing import check_encoder, tiny_model_config
from metamorph_core.testing.samples import generation, understanding

TOWER = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": 64,
    "patch_size": 4,
}


@pytest.fixture(scope="module")
def dinov2_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("dinov2")
    torch.manual_seed(0)
    transformers.Dinov2Model(transformers.Dinov2Config(**TOWER)).save_pretrained(path)
    transformers.BitImageProcessor(
        size={"shortest_edge": 36},
        crop_size={"height": 32, "width": 32},
        do_center_crop=True,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    ).save_pretrained(path)
    return path


def test_listed_by_the_cli_with_its_distribution():
    res = subprocess.run(
        [sys.executable, "-m", "metamorph_core.cli", "plugins", "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    rows = [r for r in json.loads(res.stdout) if r["name"] == "dinov2"]
    assert rows and rows[0]["kind"] == "encoder" and rows[0]["distribution"] == "metamorph-dinov2"


def test_passes_the_conformance_suite_and_reads_the_right_layer(dinov2_dir):
    enc = create("encoder", "dinov2", pretrained=str(dinov2_dir), num_tokens=16)
    assert enc.image_size == (32, 32) and enc.grid == (8, 8)  # the processor's crop, not 64
    check_encoder(enc)
    raw = transformers.Dinov2Model.from_pretrained(dinov2_dir)
    pixels = enc.preprocess([torch.rand(3, 50, 40)])
    with torch.no_grad():
        ref = raw(pixel_values=pixels, output_hidden_states=True).hidden_states[-1][:, 1:]
        grid = ref.reshape(1, 8, 8, 32).permute(0, 3, 1, 2)
        ref = F.normalize(
            F.interpolate(grid, size=(4, 4), mode="bilinear", align_corners=False)
            .permute(0, 2, 3, 1)
            .reshape(1, 16, 32),
            dim=-1,
        )
        assert torch.allclose(enc(pixels), ref, atol=1e-6)


def test_builds_and_trains_a_unified_model_by_name(dinov2_dir, backbone_dirs, tmp_path):
    cfg = tiny_model_config(
        backbone_dirs["llama"],
        encoder={"name": "dinov2", "kwargs": {"pretrained": str(dinov2_dir), "num_tokens": 16}},
    )
    model = MetaMorphModel.from_config(cfg)
    batch = model.prepare_batch([understanding(size=40), generation(size=40)])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    first = model(**batch)
    first.loss.backward()
    optimizer.step()
    with torch.no_grad():
        second = model(**batch)
    assert int(first.visual_tokens) == 16 and second.loss < first.loss
    loaded = MetaMorphModel.from_pretrained(model.save_pretrained(tmp_path / "ckpt"))
    with torch.no_grad():
        assert torch.equal(model.eval()(**batch).loss, loaded.eval()(**batch).loss)


def test_checkpoints_with_register_tokens_are_refused_clearly(tmp_path):
    transformers.Dinov2WithRegistersModel(
        transformers.Dinov2WithRegistersConfig(**TOWER, num_register_tokens=4)
    ).save_pretrained(tmp_path)
    with pytest.raises(Exception, match="register tokens need Dinov2WithRegistersModel"):
        create("encoder", "dinov2", pretrained=str(tmp_path))
