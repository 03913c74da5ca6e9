"""Shared fixtures: tiny real backbones saved with save_pretrained, loaded by our loaders."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from metamorph_core import MetaMorphModel
from metamorph_core.testing import samples, save_tiny_backbone, tiny_model_config

transformers.utils.logging.disable_progress_bar()


@pytest.fixture(scope="session")
def backbone_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("backbones")
    return {fam: save_tiny_backbone(root / fam, fam, seed=1) for fam in ("llama", "qwen2", "qwen3")}


@pytest.fixture
def make_model(backbone_dirs):
    def make(family: str = "llama", **overrides) -> MetaMorphModel:
        torch.manual_seed(0)
        return MetaMorphModel.from_config(tiny_model_config(backbone_dirs[family], **overrides))

    return make


image = samples.random_image
understanding = samples.understanding
generation = samples.generation
text_only = samples.text_only
