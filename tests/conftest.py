"""Shared fixtures: tiny real backbones saved with save_pretrained, loaded by our loaders."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from metamorph_core import MetaMorphModel
from metamorph_core.conversation import Conversation, Turn
from metamorph_core.testing import save_tiny_backbone, tiny_model_config

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


def image(seed: int, size: int = 16) -> torch.Tensor:
    return torch.rand(3, size, size, generator=torch.Generator().manual_seed(seed))


def understanding(seed: int = 0) -> Conversation:
    return Conversation(
        [
            Turn("user", "<image>\nWhat colour is the shape?"),
            Turn("assistant", "the shape is red."),
        ],
        [image(seed)],
        id=f"und-{seed}",
    )


def generation(seed: int = 1) -> Conversation:
    return Conversation(
        [
            Turn("user", "generate an image of a red square"),
            Turn("assistant", "here is an image based on your request: <image>"),
        ],
        [image(seed)],
        id=f"gen-{seed}",
    )


def text_only() -> Conversation:
    return Conversation([Turn("user", "two plus three"), Turn("assistant", "five")], id="text")
